"""What an assistant (the offline Natalia, or Claude in claude.py) is given and gives back. Pure.

`Assistant.reply(session, photos)` reads the conversation (the legacy session: the newest user messages are the
ones to answer) and returns the text to say; photos it decides to send go through `photos.send_photos(album,
count)`, the one photo path both assistants share (Claude calls it as a tool). The tool hands out the next images
of an album that this customer has not received yet, remembers them, and answers in words the model can read.

`Outgoing` is one WhatsApp message (a text or an image), and a reply's readable record for the session
(`record_text`) keeps what was sent, so the history Natalia reads later says which photos went out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from . import sessions
from .catalog import MAX_IMAGES_PER_REPLY, Catalog, Image


@dataclass(frozen=True)
class Outgoing:
    """One message to send: a text, or an image (link or media id, optional caption)."""

    text: str | None = None
    image: Image | None = None

    def to_json(self) -> dict[str, object]:
        if self.image is None:
            return {"text": self.text}
        return {"image": {k: v for k, v in vars(self.image).items() if v is not None}}

    @classmethod
    def from_json(cls, obj: dict[str, object]) -> Outgoing:
        image = obj.get("image")
        if isinstance(image, dict):
            return cls(image=Image(**{k: str(v) for k, v in image.items() if k in ("link", "media_id", "caption")}))
        return cls(text=str(obj.get("text") or ""))


@dataclass
class PhotoTool:
    """send_photos(album, count) for one reply; `sent` starts as the session's progress per album."""

    catalog: Catalog
    sent: dict[str, int] = field(default_factory=dict)
    images: list[tuple[str, int, Image]] = field(default_factory=list)  # (album id, index, image) in send order
    last_album: str | None = None

    def send_photos(self, album: str, count: int = 3) -> str:
        """Queue the next `count` images of `album`; returns what happened, in words (the tool result)."""
        found = self.catalog.get(album)
        if found is None:
            known = ", ".join(self.catalog.albums) or "ninguno"
            return f"No existe el álbum {album!r}. Álbumes disponibles: {known}."
        self.last_album = album
        room = MAX_IMAGES_PER_REPLY - len(self.images)
        if room <= 0:
            return f"Ya van {MAX_IMAGES_PER_REPLY} fotos en esta respuesta: envía más en la siguiente."
        count = max(1, min(int(count), room))
        start = self.sent.get(album, 0)
        batch = found.after(start, count)
        if not batch:
            return f"Ya se enviaron las {len(found.images)} fotos de {found.title}; no quedan más."
        for offset, image in enumerate(batch):
            self.images.append((album, start + offset, image))
        self.sent[album] = start + len(batch)
        left = len(found.images) - self.sent[album]
        span = f"{start + 1}-{start + len(batch)} de {len(found.images)}"
        return f"Enviadas {len(batch)} fotos de {found.title} ({span}); quedan {left}."

    def outgoing(self) -> list[Outgoing]:
        return [Outgoing(image=image) for _, _, image in self.images]


class Assistant(Protocol):
    async def reply(self, session: sessions.Session, photos: PhotoTool) -> str: ...


def record_text(text: str, photos: PhotoTool) -> str:
    """What the session keeps of a reply: its text, then a readable line per album of the photos sent."""
    lines = [text] if text else []
    albums: dict[str, list[int]] = {}
    for album, index, _ in photos.images:
        albums.setdefault(album, []).append(index + 1)
    for album, numbers in albums.items():
        found = photos.catalog.get(album)
        title = found.title if found else album
        span = f"{numbers[0]}-{numbers[-1]}" if len(numbers) > 1 else f"{numbers[0]}"
        lines.append(f"[fotos enviadas: {title} {span}]")
    return "\n".join(lines)


def pending_user_text(session: sessions.Session) -> list[str]:
    """The user messages after the newest assistant message: what a reply answers."""
    texts: list[str] = []
    for m in reversed(session["messages"]):
        if m["role"] == "assistant":
            break
        texts.append(m["content"])
    return texts[::-1]
