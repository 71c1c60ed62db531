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
    """Lowercase without accents: "¿Tienes MÁS fotos?" -> "¿tienes mas fotos?"."""
    # NFKD splits "á" into "a" + a combining accent; dropping what is not ASCII (accents, "¿", emoji) leaves the
    # words to match, in C rather than a Python loop per character
    return unicodedata.normalize("NFKD", text.lower()).encode("ascii", "ignore").decode()


def _has_word(text: str, words: tuple[str, ...]) -> bool:
    padded = f" {text} "
    return any(w in padded for w in words)


class OfflineNatalia:
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog  # fixed for the process (catalog_file is a restart-only setting): worked out once
        self._keywords = [(a.id, {a.id} | {_plain(k) for k in a.keywords}) for a in catalog.albums.values()]
        titles = [a.title for a in catalog.albums.values()]
        self._titles_text = " o ".join(titles) if len(titles) <= 2 else ", ".join(titles[:-1]) + " o " + titles[-1]

    def _titles(self) -> str:
        return self._titles_text

    def _album_named(self, text: str) -> str | None:
        words = {w.strip("¿?¡!.,;:") for w in text.split()}
        for album, keywords in self._keywords:
            if not keywords.isdisjoint(words):
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
