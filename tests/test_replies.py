"""Replies as the daemon schedules them (replies.py), on a real store: one at a time per phone in arrival order,
phones concurrently up to the bound, only once the message is durable, failures contained, and a bounded close."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from natalia_secure import sessions
from natalia_secure.metrics import Metrics
from natalia_secure.replies import Conversations, OfflineAssistant
from natalia_secure.store import Store
from natalia_secure.whatsapp import Inbound


def inbound(phone: str, n: int, text: str | None = None) -> Inbound:
    return Inbound(f"wamid.{phone}.{n}", phone, 1_770_000_000_000, "text", text or f"m{n}")


@dataclass
class SlowAssistant:
    """Answers with the text it was given, after `delay`; records how many replies run at once."""

    delay: float = 0.02
    running: int = 0
    most: int = 0
    seen: list[tuple[str, str]] = field(default_factory=list)
    fail_on: str | None = None

    async def reply(self, phone: str, session: sessions.Session, message: Inbound) -> str | None:
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await asyncio.sleep(self.delay)
            self.seen.append((phone, message.text))
            if message.text == self.fail_on:
                raise RuntimeError("assistant bug")
            return f"re: {message.text}"
        finally:
            self.running -= 1


@dataclass
class Recorder:
    sent: list[tuple[str, str, str | None]] = field(default_factory=list)

    async def send_text(self, phone: str, text: str, reply_to: str | None) -> None:
        self.sent.append((phone, text, reply_to))


async def accept(store: Store, conversations: Conversations, message: Inbound) -> None:
    lsn = store.add_message(message.phone, "user", message.text, store.clock(), message_id=message.id)
    conversations.submit(message, lsn)


async def settle(conversations: Conversations) -> None:
    for _ in range(1000):
        if not conversations.pending:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("did not settle")


def test_one_reply_at_a_time_per_phone_in_arrival_order_and_phones_in_parallel(store: Store) -> None:
    """Five messages each from six phones, concurrency 3: each phone's replies follow its messages' order, at most
    three replies run at once, and more than one does."""

    async def go() -> None:
        assistant, outbox = SlowAssistant(), Recorder()
        conversations = Conversations(store, assistant, outbox, Metrics(), concurrency=3)
        phones = [f"3460000000{i}" for i in range(6)]
        for n in range(5):
            for phone in phones:
                await accept(store, conversations, inbound(phone, n))
        await settle(conversations)
        assert assistant.most == 3
        for phone in phones:
            assert [t for p, t in assistant.seen if p == phone] == [f"m{n}" for n in range(5)]
            assert [t for p, t, _ in outbox.sent if p == phone] == [f"re: m{n}" for n in range(5)]
            assert [m["role"] for m in store.get(phone)["messages"]].count("assistant") == 5
        await conversations.close(1)

    asyncio.run(go())


def test_the_reply_is_recorded_in_the_session_and_sent_to_the_message(store: Store) -> None:
    """The offline Natalia greets a first message; the reply is in the history (role assistant) and answers its wamid."""

    async def go() -> None:
        outbox = Recorder()
        conversations = Conversations(store, OfflineAssistant(), outbox, Metrics())
        await accept(store, conversations, inbound("34600000001", 0, "Hola"))
        await settle(conversations)
        phone, text, reply_to = outbox.sent[0]
        assert (phone, reply_to) == ("34600000001", "wamid.34600000001.0") and "Natalia" in text
        assert store.get(phone)["messages"][-1] == {
            "role": "assistant",
            "content": text,
            "timestamp": store.get(phone)["lastActivity"],
        }

    asyncio.run(go())


def test_no_reply_before_the_message_is_durable(store: Store) -> None:
    """A reply waits for the message's fsync: when the assistant runs, the message's record is already durable."""

    async def go() -> None:
        durable_when_asked: list[bool] = []

        class Checking(SlowAssistant):
            async def reply(self, phone: str, session: sessions.Session, message: Inbound) -> str | None:
                durable_when_asked.append(store._journal is not None and store._journal.durable_lsn >= store.lsn)
                return "ok"

        conversations = Conversations(store, Checking(), Recorder(), Metrics())
        await accept(store, conversations, inbound("34600000001", 0))
        await settle(conversations)
        assert durable_when_asked == [True]

    asyncio.run(go())


def test_a_failing_assistant_is_counted_and_the_conversation_goes_on(store: Store) -> None:
    """A bug in the assistant fails one reply (counted as failed, logged), not the phone's later messages."""

    async def go() -> None:
        metrics = Metrics()
        outbox = Recorder()
        conversations = Conversations(store, SlowAssistant(delay=0, fail_on="m1"), outbox, metrics)
        for n in range(3):
            await accept(store, conversations, inbound("34600000001", n))
        await settle(conversations)
        assert [t for _, t, _ in outbox.sent] == ["re: m0", "re: m2"]
        assert metrics.registry.get_sample_value("natalia_replies_total", {"outcome": "failed"}) == 1
        assert metrics.registry.get_sample_value("natalia_replies_total", {"outcome": "sent"}) == 2

    asyncio.run(go())


def test_close_waits_a_bounded_time_and_reports_what_is_left(store: Store) -> None:
    """Replies slower than the stop budget are cancelled; close says how many accepted messages were left."""

    async def go() -> None:
        conversations = Conversations(store, SlowAssistant(delay=5), Recorder(), Metrics(), concurrency=2)
        for n in range(2):
            await accept(store, conversations, inbound("34600000001", n))
        await accept(store, conversations, inbound("34600000002", 0))
        await asyncio.sleep(0.05)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        left = await conversations.close(timeout=0.2)
        assert left == 3 and loop.time() - t0 < 1

    asyncio.run(go())


def test_a_session_forgotten_before_its_reply_gets_none(store: Store) -> None:
    """Purged between acceptance and reply: nothing is sent and nothing recreated."""

    async def go() -> None:
        outbox = Recorder()
        conversations = Conversations(store, SlowAssistant(delay=0.05), outbox, Metrics())
        await accept(store, conversations, inbound("34600000001", 0))
        store.purge("34600000001")
        await settle(conversations)
        assert outbox.sent == [] and "34600000001" not in store

    asyncio.run(go())
