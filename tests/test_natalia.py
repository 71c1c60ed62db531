"""The offline Natalia (natalia.py): the legacy scenario's answers, photos through the shared tool, and sensible
answers to everything else. Pure: sessions in, text out."""

from __future__ import annotations

import asyncio

import pytest

from natalia_secure import catalog, sessions
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
