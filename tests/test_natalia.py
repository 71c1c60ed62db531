"""The offline Natalia (natalia.py): the legacy scenario's answers, photos through the shared tool, and sensible
answers to everything else. Pure: sessions in, text out."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from natalia_secure import catalog, natalia, sessions
from natalia_secure.assistant import PhotoTool
from natalia_secure.natalia import OfflineNatalia

CATALOG = catalog.load(None)


def ask(texts: list[str], photos: PhotoTool | None = None) -> tuple[str, PhotoTool]:
    session = sessions.new_session(1)
    for i, text in enumerate(texts):
        sessions.append_message(session, "user" if i % 2 == 0 else "assistant", text, i + 1)
    tool = photos or PhotoTool(CATALOG)
    return asyncio.run(OfflineNatalia(CATALOG).reply(session, tool)), tool


def test_a_first_message_is_greeted_with_what_she_can_show() -> None:
    text, tool = ask(["Hola"])
    assert text.startswith("¡Hola! Soy Natalia") and "Salado o Dulce" in text and tool.images == []


@pytest.mark.parametrize("request_text", ["Quiero fotos de salado", "FOTOS DE SALADOS!", "¿me enseñas lo salado?", "salado"])
def test_asking_for_an_album_sends_its_first_three_photos(request_text: str) -> None:
    text, tool = ask(["Hola", "¡Hola!", request_text])
    assert "fotos de Salado" in text and [i for _, i, _ in tool.images] == [0, 1, 2] and tool.sent == {"salado": 3}


def test_more_photos_continue_the_last_album_and_then_say_none_are_left() -> None:
    """'¿Tienes más fotos?' names no album: the last one asked for continues; at its end she says so."""
    tool = PhotoTool(CATALOG, {"salado": 3}, last_album="salado")
    text, tool = ask(["Hola", "¡Hola!", "¿Tienes más fotos?"], tool)
    assert "más fotos de Salado" in text and [i for _, i, _ in tool.images] == [3, 4, 5]
    text, tool = ask(["Hola", "¡Hola!", "¿Tienes más fotos?"], PhotoTool(CATALOG, {"salado": 6}, last_album="salado"))
    assert "todas las fotos de Salado" in text and "Dulce" in text and tool.images == []


def test_photos_without_an_album_get_a_question() -> None:
    text, tool = ask(["Hola", "¡Hola!", "¿Tienes fotos?"])
    assert "¿De qué te gustaría ver fotos?" in text and tool.images == []


@pytest.mark.parametrize(
    ("said", "expected"),
    [("muchas gracias", "¡A ti!"), ("[image: una tarta]", "Puedo enseñarte fotos"), ("[voice message]", "Puedo enseñarte fotos")],
)
def test_everything_else_gets_a_sensible_answer(said: str, expected: str) -> None:
    """Thanks, and the placeholders of media messages (whatsapp.readable_text), get polite answers."""
    text, _ = ask(["Hola", "¡Hola!", said])
    assert expected in text


# The words of a message, as the offline Natalia first matched them (a set of stripped tokens); _has_token says the
# same without a string per token. Drawn from an alphabet dense in keyword letters, edges and kinds of whitespace.
TOKEN_TEXT = st.text(alphabet="salado ?!.,;:\t\n\x1cx", max_size=40)


@settings(max_examples=3000, deadline=None)
@given(text=TOKEN_TEXT, word=st.sampled_from(["salado", "salados", "a", "la.do", "s?a"]))
def test_has_token_says_what_the_set_of_stripped_tokens_says(text: str, word: str) -> None:
    assert natalia._has_token(text, word) is (word in {t.strip(natalia.EDGES) for t in text.split()})


@given(text=st.text(max_size=30))
def test_plain_is_lowercase_ascii_without_accents(text: str) -> None:
    plain = natalia._plain(text)
    assert plain.isascii() and plain == plain.lower()
    assert natalia._plain("¿Tienes MÁS fotos? 📸 Ñandú") == "tienes mas fotos?  nandu"


def test_album_keywords_match_with_the_punctuation_around_them_and_only_as_whole_words() -> None:
    named = OfflineNatalia(CATALOG)._album_named
    assert named("quiero ver salados, y dulces!") == "salado"  # catalog order, wherever each is named
    assert named("y...dulces?!") is None and named("ensaladas") is None and named("saladitos") is None
    assert named("unas tartas;") == "dulce" and named("?") is None


def test_a_keyword_of_several_words_or_with_punctuation_is_matched_as_written() -> None:
    albums = {"horno": catalog.Album("horno", "Pan", CATALOG.albums["salado"].images, ("pan  dulce", "¿baguette ?"))}
    named = OfflineNatalia(catalog.Catalog(albums))._album_named
    assert named("quiero pan dulce!") == "horno" and named("una baguette") == "horno"
    assert named("pan, dulce") is None and named("el pan") is None
