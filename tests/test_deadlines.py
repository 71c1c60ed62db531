"""deadlines.Deadlines: callbacks run once their time has passed (within a sweep), never after `clear` or a renewed
`set`; one failing callback does not stop the others, or the sweeps after it; a new event loop gets its own sweep."""

from __future__ import annotations

import asyncio

import pytest

from natalia_secure import deadlines
from natalia_secure.deadlines import Deadlines


@pytest.fixture(autouse=True)
def fast_sweep(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(deadlines, "SWEEP_S", 0.05)


def test_due_callbacks_run_once_and_cleared_or_renewed_ones_do_not() -> None:
    async def go() -> list[str]:
        fired: list[str] = []
        d = Deadlines()
        d.set("due", 0.1, lambda: fired.append("due"))
        d.set("cleared", 0.1, lambda: fired.append("cleared"))
        d.set("renewed", 0.1, lambda: fired.append("renewed"))
        d.clear("cleared")
        await asyncio.sleep(0.08)
        d.set("renewed", 0.3, lambda: fired.append("renewed"))
        await asyncio.sleep(0.15)
        assert fired == ["due"]
        await asyncio.sleep(0.3)
        return fired

    assert asyncio.run(go()) == ["due", "renewed"]


def test_a_failing_callback_stops_neither_the_others_nor_later_sweeps() -> None:
    async def go() -> list[str]:
        fired: list[str] = []

        def broken() -> None:
            raise RuntimeError("a bug in a callback")

        d = Deadlines()
        d.set("broken", 0.01, broken)
        d.set("fine", 0.01, lambda: fired.append("fine"))
        await asyncio.sleep(0.2)
        d.set("later", 0.01, lambda: fired.append("later"))
        await asyncio.sleep(0.2)
        return fired

    assert asyncio.run(go()) == ["fine", "later"]


def test_a_new_event_loop_gets_its_own_sweep() -> None:
    d = Deadlines()
    fired: list[int] = []

    async def arm(n: int) -> None:
        d.set(n, 10.0 if n == 1 else 0.01, lambda: fired.append(n))  # the first loop ends with its entry pending
        await asyncio.sleep(0.2)

    asyncio.run(arm(1))
    asyncio.run(arm(2))
    assert fired == [2]
