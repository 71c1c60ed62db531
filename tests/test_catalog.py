"""The photo catalog (catalog.py): the built-in albums load, `after` pages through an album, and every malformed
catalog is a ConfigError that names where."""

from __future__ import annotations

import pytest

from natalia_secure import catalog
from natalia_secure.errors import ConfigError


def test_the_built_in_catalog_has_the_demo_albums() -> None:
    """The package ships albums with https links and captions: what the demo and the offline Natalia use."""
    c = catalog.load(None)
    salado = c.get("salado")
    assert salado is not None and salado.title == "Salado" and len(salado.images) >= 6
    assert all(i.link and i.link.startswith("https://example.com/") and i.caption for i in salado.images)
    assert "salado" in salado.keywords
    assert "- salado: Salado (6 fotos)" in c.describe()


def test_after_pages_through_an_album_and_stops_at_its_end() -> None:
    """3 then 3 more then none: 'más fotos' sends the next ones, and there is an end."""
    salado = catalog.load(None).get("salado")
    assert salado is not None
    first, second, third = salado.after(0, 3), salado.after(3, 3), salado.after(6, 3)
    assert [i.caption for i in first + second] == [i.caption for i in salado.images]
    assert third == () and salado.after(5, 3) == salado.images[5:] and salado.after(0, -1) == ()


def test_a_file_catalog_with_links_and_media_ids(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Images may be links or uploaded media ids; the title defaults to the id."""
    path = tmp_path / "cat.toml"
    path.write_text(
        '[[album]]\nid = "tartas"\nimages = [{ media_id = "123" }, { link = "https://x.test/a.jpg", caption = "A" }]\n'
    )
    c = catalog.load(str(path))
    tartas = c.get("tartas")
    assert tartas is not None and tartas.title == "tartas"
    assert tartas.images == (catalog.Image(media_id="123"), catalog.Image(link="https://x.test/a.jpg", caption="A"))


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[[album]\n", "photo catalog"),
        ("albums = []\n", "unknown key(s) albums"),
        ('[[album]]\nid = "Bad Id"\nimages = [{ media_id = "1" }]\n', "album[0].id"),
        ('[[album]]\nid = "a"\nimages = []\n', "album[0].images must be a non-empty array"),
        ('[[album]]\nid = "a"\nimages = [{ caption = "x" }]\n', "exactly one of link or media_id"),
        ('[[album]]\nid = "a"\nimages = [{ link = "http://x/a.jpg" }]\n', "https://"),
        ('[[album]]\nid = "a"\nimages = [{ media_id = "1", link = "https://x/a" }]\n', "exactly one"),
        ('[[album]]\nid = "a"\nimages = [{ media_id = "1", size = 3 }]\n', "unknown key(s) size"),
        ('[[album]]\nid = "a"\nimages = [{ media_id = "1" }]\n[[album]]\nid = "a"\nimages = [{ media_id = "2" }]\n', "twice"),
        ('[[album]]\nid = "a"\nkeywords = "x"\nimages = [{ media_id = "1" }]\n', "keywords"),
        ('[[album]]\nid = "a"\nimages = [{ media_id = "1", caption = "' + "c" * 1025 + '" }]\n', "caption"),
    ],
)
def test_a_malformed_catalog_names_the_problem(tmp_path, text: str, fragment: str) -> None:  # type: ignore[no-untyped-def]
    """Each mistake is one ConfigError (exit 3) saying where it is."""
    path = tmp_path / "cat.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        catalog.load(str(path))
    assert fragment in str(err.value)


def test_a_missing_catalog_file_is_a_config_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match="cannot read photo catalog"):
        catalog.load(str(tmp_path / "absent.toml"))
