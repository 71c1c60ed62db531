"""Replies as the daemon schedules them (replies.py), on a real store: one turn at a time per phone in arrival order,
phones concurrently up to the bound, only once the message is durable; the reply's intent durable before it is sent;
photos through the shared tool; the 24-hour window; send failures dropped or deferred; resume after a crash."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from natalia_secure import catalog, replies, sessions
from natalia_secure.assistant import Outgoing, PhotoTool, pending_user_text
from natalia_secure.errors import SendError
from natalia_secure.metrics import Metrics
from natalia_secure.natalia import OfflineNatalia
from natalia_secure.replies import WINDOW_MS, Conversations, parse_tag, part_tag
from natalia_secure.store import Store

CATALOG = catalog.load(None)
PHONE = "34600000001"


@dataclass
class SlowAssistant:
    """Answers "re: <the texts it answers>" after `delay`; records how many replies run at once."""

    delay: float = 0.02
    running: int = 0
    most: int = 0
    answered: list[tuple[str, list[str]]] = field(default_factory=list)
    fail_on: str | None = None

    async def reply(self, session: sessions.Session, photos: PhotoTool) -> str:
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await asyncio.sleep(self.delay)
            texts = pending_user_text(session)
            self.answered.append((session["messages"][0]["content"], texts))
            if self.fail_on in texts:
                self.fail_on = None  # once
                raise RuntimeError("assistant bug")
            return "re: " + " + ".join(texts)
        finally:
            self.running -= 1


@dataclass
class Recorder:
    """An outbox that keeps what it was asked to send; `fail` holds SendErrors to raise first."""

    store: Store | None = None
    sent: list[tuple[str, Outgoing, str | None]] = field(default_factory=list)
    reads: list[str] = field(default_factory=list)
    fail: list[SendError] = field(default_factory=list)
    durable_at_send: list[bool] = field(default_factory=list)

    async def send(self, to: str, part: Outgoing, reply_to: str | None = None) -> str:
        if self.store is not None and self.store._journal is not None and reply_to is not None:  # a reply's first part
            self.durable_at_send.append(self.store._journal.durable_lsn >= self.store.lsn)  # the intent is durable
        if self.fail:
            raise self.fail.pop(0)
        self.sent.append((to, part, reply_to))
        return f"wamid.out.{len(self.sent)}"

    async def mark_read(self, message_id: str, typing: bool = False) -> None:
        self.reads.append(message_id)

    def texts(self, phone: str = PHONE) -> list[str]:
        return [p.text or "" for to, p, _ in self.sent if to == phone and p.text is not None]


def conversations(store: Store, assistant: object, outbox: Recorder, **kw: object) -> Conversations:
    return Conversations(store, assistant, outbox, Metrics(), CATALOG, **kw)  # type: ignore[arg-type]


def accept(store: Store, conv: Conversations, phone: str, text: str, n: int) -> None:
    wamid = f"wamid.{phone}.{n}"
    conv.submit(phone, wamid, store.add_message(phone, "user", text, store.clock(), message_id=wamid))


async def settle(conv: Conversations) -> None:
    for _ in range(1000):
        if not conv.pending:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("did not settle")


def sample(conv: Conversations, name: str, **labels: str) -> float:
    return conv.metrics.registry.get_sample_value(name, labels or None) or 0.0


def interrupted_reply(store: Store, reply_id: str | None = None) -> list[Outgoing]:
    """Record what a crash left of a 4-part reply to PHONE (text + 3 photos): 1 part recorded as sent; with
    `reply_id`, recorded by an earlier run with tags. Returns the parts."""
    now = store.clock()
    parts = [Outgoing(text="aquí tienes")] + [Outgoing(image=i) for i in CATALOG.albums["salado"].images[:3]]
    store.add_message(PHONE, "user", "fotos de salado", now, message_id="w1")
    pending: dict[str, object] = {"parts": [p.to_json() for p in parts], "reply_to": "w1"}
    if reply_id is not None:
        pending.update(id=reply_id, run="earlier")
    meta = {"pending": pending, "sent_parts": 1}
    store.add_message(PHONE, "assistant", "aquí tienes\n[fotos enviadas: Salado 1-3]", now, meta=meta)
    return parts


def test_turns_per_phone_in_order_and_phones_in_parallel_up_to_the_bound(store: Store) -> None:
    """Five messages each from six phones, concurrency 3: every message answered exactly once and in order (messages
    that arrive during a turn are answered together by the next), at most three turns at once and more than one."""

    async def go() -> None:
        assistant, outbox = SlowAssistant(), Recorder()
        conv = conversations(store, assistant, outbox, concurrency=3)
        phones = [f"3460000000{i}" for i in range(6)]
        for n in range(5):
            for phone in phones:
                accept(store, conv, phone, f"{phone[-1]}m{n}", n)
            await asyncio.sleep(0.005)
        await settle(conv)
        assert assistant.most == 3
        for phone in phones:
            answered = [t for first, texts in assistant.answered if first == f"{phone[-1]}m0" for t in texts]
            assert answered == [f"{phone[-1]}m{n}" for n in range(5)]
            session = store.get(phone)
            assert pending_user_text(session) == [] and "natalia" not in session  # nothing pending afterwards

    asyncio.run(go())


def test_the_legacy_scenario_with_photos_through_the_offline_natalia(store: Store) -> None:
    """Hola -> greeting; fotos de salado -> text + photos 1-3; más fotos -> 4-6; más fotos -> none left, said so. The
    session holds each reply as readable text and the photo progress; the inbound message is marked read."""

    async def go() -> None:
        outbox = Recorder(store)
        conv = conversations(store, OfflineNatalia(CATALOG), outbox)
        for n, text in enumerate(["Hola", "Quiero fotos de salado", "¿Tienes más fotos?", "¿Tienes más fotos?"]):
            accept(store, conv, PHONE, text, n)
            await settle(conv)
        images = [p.image.caption for _, p, _ in outbox.sent if p.image is not None]  # type: ignore[union-attr]
        assert images == [i.caption for i in CATALOG.albums["salado"].images]
        texts = outbox.texts()
        assert texts[0].startswith("¡Hola! Soy Natalia") and "fotos de Salado" in texts[1] and "más fotos de Salado" in texts[2]
        assert "todas las fotos de Salado" in texts[3]
        session = store.get(PHONE)
        assert len(session["messages"]) == 8
        assert session["messages"][3]["content"].endswith("[fotos enviadas: Salado 1-3]")
        assert session["messages"][5]["content"].endswith("[fotos enviadas: Salado 4-6]")
        assert store.meta(PHONE) == {"photos": {"salado": 6}, "last_album": "salado"}
        assert outbox.reads == [f"wamid.{PHONE}.{n}" for n in range(4)]
        assert all(outbox.durable_at_send)
        assert outbox.sent[0][2] == f"wamid.{PHONE}.0"  # the reply quotes the message it answers

    asyncio.run(go())


def test_no_reply_before_the_message_and_its_intent_are_durable(store: Store) -> None:
    """The assistant runs after the message's fsync; the outbox is called after the intent's fsync."""

    async def go() -> None:
        seen: list[bool] = []

        class Checking(SlowAssistant):
            async def reply(self, session: sessions.Session, photos: PhotoTool) -> str:
                seen.append(store._journal is not None and store._journal.durable_lsn >= store.lsn)
                return "ok"

        outbox = Recorder(store)
        conv = conversations(store, Checking(), outbox)
        accept(store, conv, PHONE, "hola", 0)
        await settle(conv)
        assert seen == [True] and outbox.durable_at_send == [True]

    asyncio.run(go())


def test_a_failing_assistant_is_counted_and_the_conversation_goes_on(store: Store) -> None:
    """A bug in the assistant fails one turn (counted, logged), not the phone's later messages."""

    async def go() -> None:
        outbox = Recorder()
        conv = conversations(store, SlowAssistant(delay=0, fail_on="m1"), outbox)
        for n in range(3):
            accept(store, conv, PHONE, f"m{n}", n)
            await settle(conv)
        assert outbox.texts() == ["re: m0", "re: m1 + m2"]  # the failed turn's message is answered by the next
        assert sample(conv, "natalia_replies_total", outcome="failed") == 1
        assert sample(conv, "natalia_replies_total", outcome="sent") == 2

    asyncio.run(go())


class Hanging:
    """An assistant whose first reply never comes (an outage upstream); the later ones are immediate."""

    def __init__(self) -> None:
        self.calls = 0

    async def reply(self, session: sessions.Session, photos: PhotoTool) -> str:
        self.calls += 1
        if self.calls == 1:
            await asyncio.Event().wait()
        return "hola"


def test_a_turn_that_hangs_gives_its_slot_back_after_the_turn_timeout(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """A turn past TURN_TIMEOUT_S (a swept deadline, deadlines.py) is cancelled and counted as failed, and its slot
    (concurrency 1 here) answers the next phone; a stop still cancels a turn as before (close() leaves it for the
    next start)."""
    monkeypatch.setattr(replies, "TURN_TIMEOUT_S", 0.2)

    async def go() -> None:
        outbox = Recorder()
        conv = conversations(store, Hanging(), outbox, concurrency=1)
        accept(store, conv, PHONE, "hola", 0)
        accept(store, conv, "34600000002", "hola", 0)
        started = asyncio.get_running_loop().time()
        await settle(conv)
        assert 0.2 <= asyncio.get_running_loop().time() - started < 5  # the sweep looks once a second
        assert sample(conv, "natalia_replies_total", outcome="failed") == 1
        assert [to for to, _, _ in outbox.sent] == ["34600000002"]
        await conv.close(timeout=1)

        stopping = conversations(store, Hanging(), Recorder(), concurrency=1)
        accept(store, stopping, PHONE, "¿sigues ahí?", 1)
        await asyncio.sleep(0.05)
        assert await stopping.close(timeout=0.1) == 1  # cancelled by the stop, not counted as a timeout
        assert sample(stopping, "natalia_replies_total", outcome="failed") == 0

    asyncio.run(go())


class Swallowing:
    """An assistant (or a client library under it) that swallows the first cancellation it gets and answers late,
    then hangs once, then answers at once."""

    def __init__(self) -> None:
        self.calls = 0

    async def reply(self, session: sessions.Session, photos: PhotoTool) -> str:
        self.calls += 1
        if self.calls == 1:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                return "tarde"
        if self.calls == 2:
            await asyncio.Event().wait()
        return "hola"


def test_a_turn_timeout_swallowed_inside_the_turn_does_not_spoil_the_next(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cancel that the turn's code swallows is taken back (as asyncio.timeout does): the next timeout of the same
    worker is still a timeout (counted, the worker goes on to the next message), not mistaken for a stop."""
    monkeypatch.setattr(replies, "TURN_TIMEOUT_S", 0.2)

    async def go() -> None:
        outbox = Recorder()
        assistant = Swallowing()
        conv = conversations(store, assistant, outbox, concurrency=1)
        accept(store, conv, PHONE, "uno", 0)
        for _ in range(500):
            if assistant.calls:
                break
            await asyncio.sleep(0.01)
        accept(store, conv, PHONE, "dos", 1)  # queued during the turn: the same worker's next turn, which hangs
        await settle(conv)
        accept(store, conv, PHONE, "tres", 2)
        await settle(conv)
        assert outbox.texts() == ["tarde", "hola"]
        assert sample(conv, "natalia_replies_total", outcome="failed") == 1
        await conv.close(timeout=1)

    asyncio.run(go())


def test_nothing_is_sent_outside_the_24_hour_window(store: Store) -> None:
    """A message answered (e.g. resumed) more than 24 h after it arrived: no free-form reply, counted."""

    async def go() -> None:
        later = [store.clock()]
        outbox = Recorder()
        conv = conversations(store, SlowAssistant(delay=0), outbox, clock=lambda: later[0])
        store.add_message(PHONE, "user", "hola", later[0], message_id="wamid.W")
        store.flush()
        later[0] += WINDOW_MS + 1
        assert await conv.resume() == 0  # resume looks only at sessions active within the window
        conv.submit(PHONE, "wamid.W", 0)  # and a turn checks it again before anything is made
        await settle(conv)
        assert outbox.sent == [] and sample(conv, "natalia_window_closed_total") == 1
        later[0] -= 2  # inside the window again (another customer would have written meanwhile)
        assert await conv.resume() == 1
        await settle(conv)
        assert outbox.texts() == ["re: hola"]

    asyncio.run(go())


@pytest.mark.parametrize(
    ("kind", "kept"),
    [
        ("window_closed", False),
        ("undeliverable", False),
        ("rejected", False),
        ("server", True),
        ("rate", True),
        ("token", True),
        ("transport", True),
    ],
)
def test_a_refused_send_drops_the_reply_and_a_failed_one_keeps_it_for_later(store: Store, kind: str, kept: bool) -> None:
    """Refused for good: dropped. Failed for now: kept pending, and the customer's next message first delivers it."""

    async def go() -> None:
        outbox = Recorder(fail=[SendError("refused", code=None, status=None, kind=kind)])
        conv = conversations(store, SlowAssistant(delay=0), outbox)
        accept(store, conv, PHONE, "uno", 0)
        await settle(conv)
        assert outbox.sent == [] and bool(store.meta(PHONE).get("pending")) is kept
        accept(store, conv, PHONE, "dos", 1)
        await settle(conv)
        assert outbox.texts() == (["re: uno", "re: dos"] if kept else ["re: dos"])
        assert store.meta(PHONE) == {}

    asyncio.run(go())


def test_resume_finishes_a_reply_cut_between_its_parts_and_answers_the_unanswered(state_dir: str, master: object) -> None:
    """After a crash: one session had a 4-part reply of which 1 part was sent; another's last message was never
    answered; a third was answered. Resume sends parts 2-4 of the first, answers the second, leaves the third."""

    async def go() -> None:
        store = Store.open(state_dir, master)  # type: ignore[arg-type]
        parts = interrupted_reply(store)
        now = store.clock()
        store.add_message("34600000002", "user", "hola", now, message_id="w2")
        store.add_message("34600000003", "user", "hola", now, message_id="w3")
        store.add_message("34600000003", "assistant", "¡Hola!", now)
        store.flush()
        outbox = Recorder()
        conv = conversations(store, OfflineNatalia(CATALOG), outbox)
        assert await conv.resume() == 2
        await settle(conv)
        first = [p for to, p, _ in outbox.sent if to == "34600000001"]
        assert first == parts[1:]
        assert outbox.texts("34600000002")[0].startswith("¡Hola!") and outbox.texts("34600000003") == []
        assert store.meta("34600000001") == {}
        await conv.close(1)
        await store.aclose()

    asyncio.run(go())


def test_close_waits_a_bounded_time_and_reports_what_is_left(store: Store) -> None:
    """Turns slower than the stop budget are cancelled; close says how many accepted messages were left."""

    async def go() -> None:
        conv = conversations(store, SlowAssistant(delay=5), Recorder(), concurrency=2)
        accept(store, conv, "34600000001", "a", 0)
        accept(store, conv, "34600000001", "b", 1)
        accept(store, conv, "34600000002", "c", 0)
        await asyncio.sleep(0.05)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert await conv.close(timeout=0.2) == 3
        assert loop.time() - t0 < 1

    asyncio.run(go())


def test_a_session_forgotten_before_its_reply_gets_none(store: Store) -> None:
    """Purged between acceptance and reply: nothing is sent and nothing recreated."""

    async def go() -> None:
        outbox = Recorder()
        conv = conversations(store, SlowAssistant(delay=0.05), outbox)
        accept(store, conv, PHONE, "hola", 0)
        store.purge(PHONE)
        await settle(conv)
        assert outbox.sent == [] and PHONE not in store

    asyncio.run(go())


def test_a_reply_cut_short_by_a_store_fault_is_sent_once_after_recovery(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reply's intent cannot be made durable (EIO): nothing is sent; once a recovery snapshot has made memory
    durable, the turn is tried again and the recorded reply goes out exactly once."""
    import errno

    from natalia_secure import journal

    real = journal.Journal._write
    armed: list[bool] = []

    def write(self: journal.Journal, batch: journal.Batch) -> None:
        if armed:
            armed.clear()
            raise OSError(errno.EIO, "Input/output error")
        real(self, batch)

    monkeypatch.setattr(journal.Journal, "_write", write)

    class Arming(SlowAssistant):
        async def reply(self, session: sessions.Session, photos: PhotoTool) -> str:
            armed.append(True)  # the next journal write (the intent's) fails
            return "re: hola"

    async def go() -> None:
        outbox = Recorder()
        conv = conversations(store, Arming(), outbox)
        accept(store, conv, PHONE, "hola", 0)
        for _ in range(200):
            if store.degraded:
                break
            await asyncio.sleep(0.01)
        assert store.degraded and outbox.sent == []
        await store.snapshot_async(full=True)  # what maintenance does within 10 s
        await settle(conv)
        assert outbox.texts() == ["re: hola"]
        assert [m["role"] for m in store.get(PHONE)["messages"]] == ["user", "assistant"] and store.meta(PHONE) == {}

    asyncio.run(go())


def test_a_reply_still_unsent_goes_first_and_no_new_one_replaces_it(store: Store) -> None:
    """WhatsApp fails for now twice: the customer's second message does not make a new reply over the unsent one;
    once sending works, the kept reply goes out first, then one answer to everything after it."""

    async def go() -> None:
        failing = [SendError("down", kind="server"), SendError("down", kind="server")]
        outbox = Recorder(fail=failing)
        assistant = SlowAssistant(delay=0)
        conv = conversations(store, assistant, outbox)
        for n, text in enumerate(["uno", "dos", "tres"]):
            accept(store, conv, PHONE, text, n)
            await settle(conv)
        assert outbox.texts() == ["re: uno", "re: dos + tres"]
        assert [texts for _, texts in assistant.answered] == [["uno"], ["dos", "tres"]]  # never asked for "dos" alone

    asyncio.run(go())


def test_a_reply_made_for_a_conversation_forgotten_meanwhile_is_discarded(store: Store) -> None:
    """Purged while the assistant worked, and the phone wrote again: the old reply is neither sent nor filed in the
    new conversation, and the new message gets its own answer."""

    async def go() -> None:
        outbox = Recorder()
        conv = conversations(store, SlowAssistant(delay=0.1), outbox)
        accept(store, conv, PHONE, "secreto viejo", 0)
        await asyncio.sleep(0.03)  # the assistant is working on it
        store.purge(PHONE)
        await asyncio.sleep(0.001)
        accept(store, conv, PHONE, "hola de nuevo", 1)
        await settle(conv)
        assert outbox.texts() == ["re: hola de nuevo"]
        assert [m["content"] for m in store.get(PHONE)["messages"]] == ["hola de nuevo", "re: hola de nuevo"]

    asyncio.run(go())


@pytest.mark.parametrize("taken", [1, 4], ids=["the text", "the last photo"])
def test_a_part_sent_just_before_the_store_degrades_is_not_sent_again(store: Store, taken: int) -> None:
    """WhatsApp takes the text (or the last photo), then the store cannot record it: after recovery the reply is
    finished without sending that part a second time, and the next message gets its own reply."""

    async def go() -> None:
        class Degrading(Recorder):
            async def send(self, to: str, part: Outgoing, reply_to: str | None = None) -> str:
                sent = await super().send(to, part, reply_to)
                if len(self.sent) == taken:
                    store._degrade("test: the disk failed right after WhatsApp took a part")
                return sent

        outbox = Degrading()
        conv = conversations(store, OfflineNatalia(CATALOG), outbox)
        accept(store, conv, PHONE, "Quiero fotos de salado", 0)
        for _ in range(200):
            if store.degraded:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        await store.snapshot_async(full=True)  # recovery
        await settle(conv)
        texts = outbox.texts()
        images = [p for _, p, _ in outbox.sent if p.image is not None]
        assert len(texts) == 1 and len(images) == 3 and store.meta(PHONE).get("pending") is None
        accept(store, conv, PHONE, "Hola", 1)
        await settle(conv)
        assert len(outbox.sent) == 5 and store.meta(PHONE).get("pending") is None

    asyncio.run(go())


# ---- tags: WhatsApp's statuses settle a part whose "sent" record is missing ----


@dataclass
class Tagging(Recorder):
    """An outbox whose statuses echo tags (as WhatsApp's do); keeps each part's tag. `status_during` makes the
    status of a part arrive while its send has not returned yet, then the send fails for now."""

    echoes_tags: bool = True
    tags: list[str | None] = field(default_factory=list)
    conv: Conversations | None = None
    status_during: int | None = None

    async def send(self, to: str, part: Outgoing, reply_to: str | None = None, tag: str | None = None) -> str:
        self.tags.append(tag)
        if self.status_during == len(self.tags) - 1 and self.conv is not None and tag is not None:
            assert self.conv.confirm(to, tag)  # WhatsApp took it and said so; its answer to us was lost
            raise SendError("read timed out", kind="network")
        return await super().send(to, part, reply_to)


def status_during_send(store: Store, part: int) -> tuple[Tagging, Conversations]:
    """Conversations whose outbox gets part `part`'s status (confirmed) before its send fails for now."""
    outbox = Tagging(status_during=part)
    conv = conversations(store, OfflineNatalia(CATALOG), outbox)
    outbox.conv = conv
    return outbox, conv


def test_tags_are_ours_or_nothing() -> None:
    assert parse_tag(part_tag("0a1b2c", 3)) == ("0a1b2c", 3)
    for other in ("", "natalia-secure:", "natalia-secure:abc.", "natalia-secure:.1", "natalia-secure:ab.\uff11", "campaign:7.1"):
        assert parse_tag(other) is None, other


def test_a_status_that_comes_before_the_send_returns_records_the_part(store: Store) -> None:
    """WhatsApp took the text and its status came, but the send then failed for now (a timeout after the
    acceptance): the text is recorded as sent, so the retry at the next message sends only the photos."""

    async def go() -> None:
        outbox, conv = status_during_send(store, 0)
        accept(store, conv, PHONE, "Quiero fotos de salado", 0)
        await settle(conv)
        assert outbox.sent == [] and store.meta(PHONE)["sent_parts"] == 1  # kept for later, its text recorded
        accept(store, conv, PHONE, "¿hola?", 1)
        await settle(conv)
        first = parse_tag(outbox.tags[0] or "")
        assert first is not None
        assert outbox.tags[:4] == [part_tag(first[0], i) for i in range(4)]  # each part once: the text not again
        assert [p.image is not None for _, p, _ in outbox.sent] == [True, True, True, False]  # then the new reply
        assert not conv.confirm(PHONE, outbox.tags[0] or "")  # a late status of it again: recorded already

    asyncio.run(go())


@pytest.mark.parametrize("confirmed", [True, False])
def test_after_a_start_an_unsure_part_waits_for_its_status(state_dir: str, master: object, confirmed: bool) -> None:
    """A reply recorded with a tag, 1 of 4 parts sent when the daemon died. At start, part 2 may be at WhatsApp:
    it waits (other conversations go on) for its status; confirmed, only parts 3-4 are sent; otherwise, after
    resend_wait, parts 2-4."""

    async def go() -> None:
        store = Store.open(state_dir, master)  # type: ignore[arg-type]
        parts = interrupted_reply(store, "c0ffee")
        store.add_message("34600000002", "user", "hola", store.clock(), message_id="w2")
        store.flush()
        outbox = Tagging()
        conv = conversations(store, OfflineNatalia(CATALOG), outbox, resend_wait=0.3 if not confirmed else 10.0)
        assert await conv.resume() == 2
        for _ in range(100):  # the other conversation is answered meanwhile
            await asyncio.sleep(0.01)
            if outbox.texts("34600000002"):
                break
        assert outbox.texts("34600000002") and [p for to, p, _ in outbox.sent if to == PHONE] == []
        assert not conv.confirm(PHONE, part_tag("bad1d0", 1))  # a status of another reply settles nothing
        assert not conv.confirm(PHONE, part_tag("c0ffee", 0))  # nor one of a part recorded already
        if confirmed:
            assert conv.confirm("34600000002", part_tag("c0ffee", 1)) is False  # another conversation's
            assert conv.confirm(PHONE, part_tag("c0ffee", 1))
        await settle(conv)
        first = [p for to, p, _ in outbox.sent if to == PHONE]
        assert first == (parts[2:] if confirmed else parts[1:])
        assert store.meta(PHONE) == {}
        assert sample(conv, "natalia_reply_parts_unsure_total", outcome="confirmed" if confirmed else "unconfirmed") == 1
        await conv.close(1)
        await store.aclose()

    asyncio.run(go())


def test_statuses_in_any_order_record_every_part_up_to_theirs(store: Store) -> None:
    """Parts go one after the other, each once WhatsApp took the one before: a status of part 2 says parts 0-2 were
    taken, and one of part 1 coming after it changes nothing."""
    now = store.clock()
    parts = [Outgoing(text="aquí tienes")] + [Outgoing(image=i) for i in CATALOG.albums["salado"].images[:3]]
    store.add_message(PHONE, "user", "fotos de salado", now, message_id="w1")
    store.add_message(PHONE, "assistant", "x", now, meta={"pending": {"parts": [p.to_json() for p in parts], "id": "ab"}})
    conv = conversations(store, OfflineNatalia(CATALOG), Tagging())
    assert conv.confirm(PHONE, part_tag("ab", 2)) and store.meta(PHONE)["sent_parts"] == 3
    assert not conv.confirm(PHONE, part_tag("ab", 1)) and not conv.confirm(PHONE, part_tag("ab", 4))
    assert conv.confirm(PHONE, part_tag("ab", 3)) and store.meta(PHONE) == {}


def test_a_message_before_resume_still_waits_for_the_unsure_part(state_dir: str, master: object) -> None:
    """An earlier run's reply had 1 of 4 parts recorded when it died; the customer writes again before resume()
    reaches the conversation. Its turn still waits for the status of part 1 first (it came: parts 2-3 only), then
    answers the new message."""

    async def go() -> None:
        store = Store.open(state_dir, master)  # type: ignore[arg-type]
        parts = interrupted_reply(store, "0ld0")
        store.flush()
        outbox = Tagging()
        conv = conversations(store, OfflineNatalia(CATALOG), outbox, resend_wait=10.0)
        accept(store, conv, PHONE, "¿hola?", 1)  # no resume() yet
        await asyncio.sleep(0.2)
        assert outbox.sent == []  # waiting for the status
        assert conv.confirm(PHONE, part_tag("0ld0", 1))
        await settle(conv)
        assert [p for _, p, _ in outbox.sent][:2] == parts[2:] and len(outbox.texts()) == 1  # then the new reply
        await conv.close(1)
        await store.aclose()

    asyncio.run(go())


def test_a_last_part_confirmed_while_its_send_failed_leaves_the_next_reply_whole(store: Store) -> None:
    """WhatsApp took the last photo and said so, but the send failed for now (its answer lost): the reply is done,
    and the next one is sent whole (nothing of the earlier reply's progress is applied to it)."""

    async def go() -> None:
        outbox, conv = status_during_send(store, 3)
        accept(store, conv, PHONE, "Quiero fotos de salado", 0)
        await settle(conv)
        assert store.meta(PHONE).get("pending") is None and len(outbox.sent) == 3  # the text and 2 photos answered
        accept(store, conv, PHONE, "Hola", 1)
        await settle(conv)
        assert len(outbox.texts()) == 2 and outbox.tags[-1] is not None and outbox.tags[-1].endswith(".0")

    asyncio.run(go())
