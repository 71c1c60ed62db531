"""The photo catalog: albums of images Natalia can send, read from a TOML file. Pure: text in, values out.

    [[album]]
    id = "salado"                       # what Claude's send_photos tool names (lowercase letters, digits, - and _)
    title = "Salado"                    # how Natalia and the session history call it
    keywords = ["salado", "salados"]    # optional: how the offline Natalia recognises a request
    images = [
      { link = "https://example.com/salado-1.jpg", caption = "Salado clásico" },
      { media_id = "1234567890" },      # an image already uploaded to WhatsApp (POST /{phone-number-id}/media)
    ]

Each image is a `link` (https URL WhatsApp fetches) or a `media_id`, with an optional caption (WhatsApp allows 1024
characters). Which images of an album a customer has already received is kept per session by the daemon
(replies.py); `Album.after(n, count)` gives the next ones.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from .errors import ConfigError

ALBUM_ID = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
MAX_CAPTION = 1024  # WhatsApp Cloud API limit for an image caption
MAX_IMAGES_PER_REPLY = 10
DEFAULT_CATALOG = "catalog.toml"  # shipped inside the package: the demo's albums


@dataclass(frozen=True)
class Image:
    link: str | None = None
    media_id: str | None = None
    caption: str | None = None


@dataclass(frozen=True)
class Album:
    id: str
    title: str
    images: tuple[Image, ...]
    keywords: tuple[str, ...] = ()

    def after(self, sent: int, count: int) -> tuple[Image, ...]:
        """The next `count` images after the first `sent` (fewer, or none, at the end of the album)."""
        return self.images[sent : sent + max(0, count)]


@dataclass(frozen=True)
class Catalog:
    albums: dict[str, Album] = field(default_factory=dict)
    source: str = "(empty)"

    def get(self, album_id: str) -> Album | None:
        return self.albums.get(album_id)

    def describe(self) -> str:
        """One line per album, for Claude's system prompt: the ids it may pass to send_photos."""
        return "\n".join(f"- {a.id}: {a.title} ({len(a.images)} fotos)" for a in self.albums.values())


def _text(obj: dict[str, Any], key: str, where: str, required: bool = True, limit: int = 256) -> str | None:
    value = obj.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip() or len(value) > limit:
        raise ConfigError(f"{where}.{key} must be a non-empty string of at most {limit} characters")
    return value


def _image(obj: object, where: str) -> Image:
    if not isinstance(obj, dict):
        raise ConfigError(f"{where} must be a table with link or media_id")
    unknown = set(obj) - {"link", "media_id", "caption"}
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    link = _text(obj, "link", where, required=False, limit=2048)
    media_id = _text(obj, "media_id", where, required=False)
    if (link is None) == (media_id is None):
        raise ConfigError(f"{where} needs exactly one of link or media_id")
    if link is not None and not link.startswith("https://"):
        raise ConfigError(f"{where}.link must be an https:// URL (WhatsApp fetches it)")
    return Image(link, media_id, _text(obj, "caption", where, required=False, limit=MAX_CAPTION))


def parse(data: bytes, source: str) -> Catalog:
    """A catalog from TOML bytes; ConfigError names the first thing wrong (file, album, image)."""
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"photo catalog {source}: {exc}") from None
    unknown = set(doc) - {"album"}
    if unknown:
        raise ConfigError(f"photo catalog {source}: unknown key(s) {', '.join(sorted(unknown))}")
    albums: dict[str, Album] = {}
    raw = doc.get("album", [])
    if not isinstance(raw, list):
        raise ConfigError(f"photo catalog {source}: album must be an array of tables ([[album]])")
    for i, a in enumerate(raw):
        where = f"photo catalog {source}: album[{i}]"
        if not isinstance(a, dict):
            raise ConfigError(f"{where} must be a table")
        unknown = set(a) - {"id", "title", "keywords", "images"}
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        album_id = _text(a, "id", where)
        assert album_id is not None
        if not ALBUM_ID.fullmatch(album_id):
            raise ConfigError(f"{where}.id must be lowercase letters, digits, - or _ (at most 64)")
        if album_id in albums:
            raise ConfigError(f"{where}: album id {album_id!r} appears twice")
        keywords = a.get("keywords", [])
        if not isinstance(keywords, list) or not all(isinstance(k, str) and k.strip() for k in keywords):
            raise ConfigError(f"{where}.keywords must be an array of strings")
        images = a.get("images")
        if not isinstance(images, list) or not images:
            raise ConfigError(f"{where}.images must be a non-empty array")
        title = _text(a, "title", where, required=False) or album_id
        albums[album_id] = Album(
            album_id,
            title,
            tuple(_image(img, f"{where}.images[{j}]") for j, img in enumerate(images)),
            tuple(k.strip().lower() for k in keywords),
        )
    return Catalog(albums, source)


def load(path: str | None) -> Catalog:
    """The catalog at `path`, or the one shipped with the package when `path` is None."""
    if path is None:
        return parse(resources.files(__package__).joinpath(DEFAULT_CATALOG).read_bytes(), f"(built in) {DEFAULT_CATALOG}")
    try:
        with open(path, "rb") as f:
            data = f.read(4 * 1024 * 1024 + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read photo catalog {path}: {exc.strerror}") from None
    if len(data) > 4 * 1024 * 1024:
        raise ConfigError(f"photo catalog {path} is larger than 4 MiB")
    return parse(data, path)
