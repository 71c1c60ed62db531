"""The offline Natalia: deterministic, rule-based, no network. The demo's assistant, and the daemon's whenever no
ANTHROPIC_API_KEY is set. It answers the legacy system's own scenario (../shared/seed/: "Hola" -> a greeting;
"Quiero fotos de salado" -> photos of Salado; "¿Tienes más fotos?" -> the next ones, and says when there are no
more) through the same photo tool Claude uses (assistant.PhotoTool), so the whole photo path is exercised offline.
"""

from __future__ import annotations

import unicodedata

from . import sessions
from .assistant import PhotoTool, pending_user_text
from .catalog import Catalog

PHOTOS_PER_REPLY = 3
GREETINGS = ("hola", "buenas", "buenos dias", "buen dia", "hey", "hello")
PHOTO_WORDS = ("foto", "imagen", "catalogo", "ver ")
MORE_WORDS = ("mas", "otra", "siguiente")
THANKS = ("gracias", "genial", "perfecto")


def _plain(text: str) -> str:
    """Lowercase ASCII without accents: "¿Tienes MÁS fotos?" -> "tienes mas fotos?"."""
    # NFKD splits "á" into "a" + a combining accent; dropping what is not ASCII (accents, "¿", emoji) leaves the
    # words to match, in C rather than a Python loop per character. Lowercased last, once the text is ASCII:
    # lower() of non-ASCII text looks up each character's Unicode case mapping, a third of this function's cost
    # in instructions (bench/README.md); the result is the same but for compatibility capitals such as the
    # modifier letter capital A (U+1D2C), which now come out lowercase too.
    if text.isascii():
        return text.lower()
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()


EDGES = "?!.,;:"  # punctuation a word may carry on either side ("¿" and "¡" are gone: _plain drops non-ASCII)


def _has_token(text: str, word: str) -> bool:
    """Whether `word` is one of the whitespace-separated tokens of `text`, the punctuation around it aside (what
    `word in {t.strip(EDGES) for t in text.split()}` says, without making a string per token: a reply reads
    every message it answers). A `word` of several words ("pan dulce") is found where the text has them one space
    apart (as a reply joins the messages it answers)."""
    start = text.find(word)
    while start != -1:
        before, after = start, start + len(word)
        while before > 0 and text[before - 1] in EDGES:
            before -= 1
        while after < len(text) and text[after] in EDGES:
            after += 1
        if (before == 0 or text[before - 1].isspace()) and (after == len(text) or text[after].isspace()):
            return True
        start = text.find(word, start + 1)
    return False


def _keyword(keyword: str) -> str:
    """A catalog keyword as _has_token looks for it: plain, its words one space apart, no punctuation at its ends."""
    return " ".join(_plain(keyword).split()).strip(EDGES).strip()


def _has_word(text: str, words: tuple[str, ...]) -> bool:
    padded = f" {text} "
    return any(w in padded for w in words)


class OfflineNatalia:
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog  # fixed for the process (catalog_file is a restart-only setting): worked out once
        # each album's words as _plain leaves them, stripped like the tokens they are compared with ("¿salado?"
        # means salado; one left with nothing, such as "?", would match any lone question mark), words one space apart
        self._keywords = [
            (a.id, sorted({w for w in ({a.id} | {_keyword(k) for k in a.keywords}) if w})) for a in catalog.albums.values()
        ]
        titles = [a.title for a in catalog.albums.values()]
        self._titles_text = " o ".join(titles) if len(titles) <= 2 else ", ".join(titles[:-1]) + " o " + titles[-1]

    def _titles(self) -> str:
        return self._titles_text

    def _album_named(self, text: str) -> str | None:
        for album, keywords in self._keywords:
            if any(_has_token(text, k) for k in keywords):
                return album
        return None

    async def reply(self, session: sessions.Session, photos: PhotoTool) -> str:
        text = _plain(" ".join(pending_user_text(session)))
        album = self._album_named(text)
        more = _has_word(text, MORE_WORDS)
        if album or _has_word(text, PHOTO_WORDS):
            target = album or photos.last_album
            if target is None:
                return f"¡Claro! ¿De qué te gustaría ver fotos? Tengo {self._titles()}."
            found = self.catalog.get(target)
            assert found is not None
            continuing = photos.sent.get(target, 0) > 0 and (more or album is None)
            photos.send_photos(target, PHOTOS_PER_REPLY)
            if photos.images:
                return f"¡Claro! Aquí tienes {'más ' if continuing else ''}fotos de {found.title} 📸"
            others = [a.title for a in self.catalog.albums.values() if a.id != target]
            also = f" ¿Quieres ver {' o '.join(others)}?" if others else ""
            return f"Ya te he enviado todas las fotos de {found.title} que tengo.{also}"
        first = sum(1 for m in session["messages"][:3] if m["role"] == "user") <= 1 and len(session["messages"]) <= 2
        if _has_word(text, GREETINGS) or first:
            return f"¡Hola! Soy Natalia 😊 ¿En qué te puedo ayudar? Si quieres, te enseño fotos de {self._titles()}."
        if _has_word(text, THANKS):
            return "¡A ti! Si necesitas algo más, aquí estoy 😊"
        return f"Gracias por tu mensaje. Puedo enseñarte fotos de {self._titles()}: dime cuál te interesa."
