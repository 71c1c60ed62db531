"""Benchmark of the sealed store against the seed's way (plaintext JSON), all figures measured in one run.

The machine is shared and noisy, so every figure is printed with the baseline measured next to it (interleaved
where it is repeated) and the ratio between them; the targets are ratios (DESIGN.md "Recommended shape",
bench/README.md says what each row measures). Only the public Store API is used, as the daemon uses it.

    .venv/bin/python bench/store.py                 # 1k, 10k, 100k sessions x 20 messages and 10k x 250
    .venv/bin/python bench/store.py --all           # ... and 1,000,000 x 2 (save, open, memory)
    .venv/bin/python bench/store.py --quick         # smoke run, seconds
    .venv/bin/python bench/store.py --sizes 100k --repeat 3 --state-dir /var/tmp

Data: synthetic sessions in the legacy shape (sessions.py), Spanish text with emoji, 60-200 characters a message,
generated from a seed so that every run measures the same bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import cryptography
import orjson
from benchlib import default_base, fs_of, machine

from natalia_secure import keyring, masterkey, sessions
from natalia_secure.clock import iso_utc, now_ms
from natalia_secure.store import Store, StoreOptions

TARGET_SIZE = "100kx20"
T0_MS = 1_770_000_000_000  # Feb 2026, like the legacy example
SEED = 20261125

# ---- sizes ----


@dataclass(frozen=True)
class Size:
    sessions: int
    messages: int

    @property
    def name(self) -> str:
        return f"{_short(self.sessions)}x{self.messages}"

    @property
    def limited(self) -> bool:
        """Very many sessions: save, open and memory only (changing every session would take minutes)."""
        return self.sessions >= 500_000


def _short(n: int) -> str:
    for unit, div in (("M", 1_000_000), ("k", 1000)):
        if n % div == 0 and n >= div:
            return f"{n // div}{unit}"
    return str(n)


def parse_size(text: str) -> Size:
    m = re.fullmatch(r"(\d+)([kKmM]?)(?:x(\d+))?", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: use N[k|M][xMESSAGES], e.g. 100k or 10kx250")
    n = int(m.group(1)) * {"": 1, "k": 1000, "m": 1_000_000}[m.group(2).lower()]
    msgs = int(m.group(3) or 20)
    if n < 100 or not 1 <= msgs <= sessions.MAX_MESSAGES:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: at least 100 sessions, 1-{sessions.MAX_MESSAGES} messages")
    return Size(n, msgs)


DEFAULT_SIZES = "1k,10k,100k,10kx250"
ALL_EXTRA = "1Mx2"
QUICK_SIZES = "1k,200x250"

# ---- synthetic data ----

USER_BITS = [
    "Hola",
    "Buenas tardes",
    "Buenos días",
    "¿Cuál es el horario? 🕐",
    "Quiero fotos de salado",
    "Tienes más fotos?",
    "¿Tienen envío a domicilio?",
    "Gracias 😊",
    "¿Cuánto cuesta la docena de empanadas?",
    "Perfecto, muchas gracias 🙏",
    "Me gustaría reservar una mesa para cuatro personas el sábado",
    "¿Aceptan tarjeta o sólo efectivo?",
    "¿Hacen tortas por encargo para cumpleaños? 🎂",
    "Vale, lo pienso y te aviso",
    "¿Dónde están ubicados?",
    "No me llegó el pedido de ayer 😕",
    "¿Tienen opciones sin gluten?",
    "Quisiera cambiar la dirección de entrega",
    "¿Abren los domingos?",
    "Ok 👍",
    "Necesito factura a nombre de mi empresa",
    "¿El precio incluye IVA?",
    "Mi número de pedido es el",
    "¿Me mandas el menú completo?",
    "Jajaja sí claro 😂",
    "Genial ❤️",
]
ASSISTANT_BITS = [
    "¡Hola! 👋 Soy Natalia, ¿en qué puedo ayudarte?",
    "Abrimos de 9:00 a 18:00, de lunes a sábado.",
    "[fotos enviadas: Salado 1-3] Aquí tienes unas fotos de Salado 📸",
    "¡Claro! Aquí van más 😊",
    "Sí, hacemos envíos a toda la ciudad; el costo depende de la zona.",
    "La docena de empanadas cuesta",
    "Con gusto te ayudo con tu reserva. ¿A qué hora te gustaría venir?",
    "Aceptamos tarjeta, efectivo y transferencia 💳",
    "Las tortas por encargo se piden con 48 horas de anticipación 🎂.",
    "Estamos en la calle Mayor, junto a la plaza.",
    "Lamento mucho el inconveniente 😔, ya lo estoy revisando con el equipo de reparto.",
    "Tenemos varias opciones sin gluten: pan, galletas y la torta de almendras.",
    "¡Listo! Dirección actualizada ✅",
    "Los domingos abrimos de 10:00 a 14:00.",
    "Para la factura necesito tu RFC o NIF y la razón social, por favor.",
    "Todos los precios incluyen IVA.",
    "Te confirmo el pedido número",
    "Aquí tienes el menú completo 📋",
    "¿Hay algo más en lo que pueda ayudarte? 😊",
    "¡Gracias a ti! Que tengas un excelente día ☀️",
]


def make_texts(rng: random.Random, bits: list[str], count: int) -> list[str]:
    """`count` distinct-ish messages of 60-200 characters built from phrases, numbers and prices."""
    out = []
    for _ in range(count):
        want = rng.randint(60, 200)
        parts: list[str] = []
        length = 0
        while length < want:
            piece = rng.choice(bits)
            if rng.random() < 0.3:
                piece += f" {rng.randint(1, 9999)}" if rng.random() < 0.5 else f" ${rng.randint(5, 950)}.{rng.randint(0, 99):02d}"
            parts.append(piece)
            length += len(piece) + 1
        out.append(" ".join(parts)[:want].rstrip())
    return out


@dataclass
class Data:
    pairs: list[tuple[str, sessions.Session]]
    by_phone: dict[str, sessions.Session] = field(repr=False)
    phones: list[str] = field(repr=False)
    texts: dict[str, list[str]] = field(repr=False)


def generate(size: Size, seed: int = SEED) -> Data:
    """Deterministic sessions: every run (and every machine) measures the same data."""
    rng = random.Random(seed)
    texts = {"user": make_texts(rng, USER_BITS, 6000), "assistant": make_texts(rng, ASSISTANT_BITS, 6000)}
    user, assistant = texts["user"], texts["assistant"]
    codes = ["34", "52", "54", "57", "51", "56", "1"]
    numbers = rng.sample(range(10**9, 10**10), size.sessions)
    pairs = []
    lo, hi = (size.messages // 2, size.messages + size.messages // 2) if size.messages >= 4 else (size.messages, size.messages)
    for x in numbers:
        count = rng.randint(lo, hi)
        ts = T0_MS + rng.randrange(180 * 86_400_000)
        first = ts
        ui = rng.choices(range(len(user)), k=(count + 1) // 2)
        ai = rng.choices(range(len(assistant)), k=count // 2)
        messages = []
        for i in range(count):
            if i % 2 == 0:
                messages.append({"role": "user", "content": user[ui[i // 2]], "timestamp": ts})
            else:
                messages.append({"role": "assistant", "content": assistant[ai[i // 2]], "timestamp": ts})
            ts += rng.randrange(2000, 600_000)
        pairs.append(
            (
                rng.choice(codes) + str(x),
                {
                    "messages": messages,
                    "lastActivity": messages[-1]["timestamp"] if messages else first,
                    "firstInteraction": first,
                },
            )
        )
    return Data(pairs, dict(pairs), [p for p, _ in pairs], texts)


class Changer:
    """Adds messages to the store and, identically, to the plain sessions the baseline writes (same data on both sides)."""

    def __init__(self, store: Store, data: Data, seed: int) -> None:
        self.store, self.data = store, data
        self.rng = random.Random(seed)
        self.clock = itertools.count(T0_MS + 200 * 86_400_000, 1000)

    def change(self, phones: list[str], mirror: bool = True) -> None:
        store, by_phone, texts, rng = self.store, self.data.by_phone, self.data.texts, self.rng
        for i, phone in enumerate(phones, 1):
            role = "user" if rng.random() < 0.5 else "assistant"
            content = rng.choice(texts[role])
            ts = next(self.clock)
            store.add_message(phone, role, content, ts)
            if mirror:
                sessions.append_message(by_phone[phone], role, content, ts, store.options.max_messages)
            if i % 20_000 == 0:
                store.flush()  # as the daemon's group commit would: bounds the pending records in memory
        store.flush()

    def some(self, fraction: float) -> list[str]:
        return self.rng.sample(self.data.phones, max(1, int(len(self.data.phones) * fraction)))


# ---- measuring helpers ----


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    gc.collect()
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def steal_seconds() -> float:
    """CPU time the hypervisor took from this VM, all CPUs (/proc/stat, proc(5)): a stall it explains is not ours."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    return int(fields[8]) / os.sysconf("SC_CLK_TCK") if len(fields) > 8 else 0.0


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def seed_save(pairs: list[tuple[str, sessions.Session]], path: str) -> tuple[float, int]:
    """The seed's way: the whole file as JSON.stringify(pairs, null, 2) writes it, written, no fsync.

    Stdlib json.dumps, not the package's sessions.dump_legacy: the baseline must not move when the package does
    (dump_legacy went pure Python for JavaScript's float text and takes ~2.3x as long; the bytes are the same for
    this data, which holds no float)."""
    gc.collect()
    t0 = time.perf_counter()
    data = json.dumps([[p, s] for p, s in pairs], indent=2, ensure_ascii=False).encode()
    with open(path, "wb") as f:
        f.write(data)
    return time.perf_counter() - t0, len(data)


def dir_bytes(path: str, prefix: str) -> int:
    return sum(e.stat().st_size for e in os.scandir(path) if e.name.startswith(prefix))


def make_state(base: str, name: str) -> tuple[str, str, masterkey.MasterKey]:
    """A master key file beside an initialised state directory (0700 + keyring), as tests/conftest.py makes them."""
    work = os.path.join(base, name)
    os.mkdir(work, 0o700)
    key_path = os.path.join(work, "master.key")
    master = masterkey.create_key_file(key_path)
    state = os.path.join(work, "state")
    os.mkdir(state, 0o700)
    os.chmod(state, 0o700)
    now = now_ms()
    keyring.save(state, keyring.Keyring.new(iso_utc(now)), master, now)
    return state, key_path, master


# ---- measurements in a fresh process (open, memory) ----


def child_main(argv: list[str]) -> int:
    """`--child MODE STATE KEY LEGACY`: one measurement in a fresh interpreter; prints a JSON line."""
    mode, state, key_path, legacy = argv
    import tracemalloc

    master = masterkey.read_key_file(key_path)
    trace = mode.startswith("mem-")
    if trace:
        tracemalloc.start()
    gc.collect()
    before = tracemalloc.get_traced_memory()[0] if trace else 0
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    held: Any
    if mode.endswith("store"):
        held = Store.open(state, master, StoreOptions())
        count = len(held)
    else:
        if mode.endswith("nogc"):
            gc.disable()
        with open(legacy, encoding="utf-8") as f:
            held = json.load(f)
        count = len(held)
    seconds = time.perf_counter() - t0
    gc.collect()
    out = {"seconds": seconds, "count": count, "rss": rss_bytes() - rss0}
    if trace:
        current, peak = tracemalloc.get_traced_memory()
        out.update(traced=current - before, peak=peak - before)
    if isinstance(held, Store):
        held.close()
    print(json.dumps(out))
    return 0


def run_child(mode: str, state: str, key_path: str, legacy: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", mode, state, key_path, legacy],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child {mode} failed ({proc.returncode}):\n{proc.stderr}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


# ---- the event loop: stalls while snapshot_async runs, and the journal under 64 writers ----


class GcPauses:
    """The cyclic collector's pauses while active (gc.callbacks): a full collection walks every live container."""

    def __init__(self) -> None:
        self.pauses: list[tuple[int, float]] = []
        self._start = 0.0

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.pauses.append((info["generation"], time.perf_counter() - self._start))

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def summary(self) -> dict[str, float]:
        full = [t for g, t in self.pauses if g == 2]
        return {
            "gc_total": sum(t for _, t in self.pauses),
            "gc_full": len(full),
            "gc_longest": max((t for _, t in self.pauses), default=0.0),
        }


async def measure_stall(work: Callable[[], Awaitable[Any]], period: float = 0.001) -> dict[str, float]:
    """Run `work` while a ticker sleeps `period` in a loop; the largest lateness is the loop's longest stall."""
    stop = False
    worst = 0.0
    ticks = 0

    async def ticker() -> None:
        nonlocal worst, ticks
        while not stop:
            t = time.perf_counter()
            await asyncio.sleep(period)
            worst = max(worst, time.perf_counter() - t - period)
            ticks += 1

    gc.collect()  # before the ticker starts: with millions of hot dicts this collection alone blocks the loop ~0.4 s
    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.02)
    worst, ticks = 0.0, 0
    steal = steal_seconds()
    with GcPauses() as pauses:
        t0 = time.perf_counter()
        await work()
        elapsed = time.perf_counter() - t0
        stop = True
        await task
    return {"stall": worst, "elapsed": elapsed, "ticks": ticks, "steal": steal_seconds() - steal, **pauses.summary()}


async def journal_run(store: Store, data: Data, writers: int, duration: float, own: bool = False) -> dict[str, float]:
    """`writers` coroutines, each add_message + await wait_durable in a loop, for `duration` seconds, each to a
    random phone of the store (`own`: each writer to one phone of its own, a session kept hot)."""
    latencies: list[float] = []
    clock = itertools.count(T0_MS + 400 * 86_400_000)
    fsyncs = 0
    real_fsync = os.fsync

    def counting_fsync(fd: Any) -> None:  # counts every fsync(2) of the process during the run
        nonlocal fsyncs
        fsyncs += 1
        real_fsync(fd)

    async def writer(k: int) -> None:
        rng = random.Random(SEED + k)
        texts = data.texts["user"]
        phones = [data.phones[k % len(data.phones)]] if own else data.phones
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            lsn = store.add_message(rng.choice(phones), "user", rng.choice(texts), next(clock))
            await store.wait_durable(lsn)
            latencies.append(time.perf_counter() - t)

    gc.collect()
    os.fsync = counting_fsync
    try:
        steal = steal_seconds()
        with GcPauses() as pauses:
            t0 = time.perf_counter()
            deadline = t0 + duration
            await asyncio.gather(*(writer(k) for k in range(writers)))
            elapsed = time.perf_counter() - t0
    finally:
        os.fsync = real_fsync
    latencies.sort()
    n = len(latencies)
    return {
        "records": n,
        "elapsed": elapsed,
        "rate": n / elapsed,
        "fsyncs": fsyncs,
        "per_fsync": n / max(1, fsyncs),
        "p50": latencies[n // 2],
        "p99": latencies[min(n - 1, int(n * 0.99))],
        "steal": steal_seconds() - steal,
        **pauses.summary(),
    }


# ---- one size ----


@dataclass
class Result:
    size: Size
    figures: dict[str, Any] = field(default_factory=dict)


def log(msg: str) -> None:
    print(f"  .. {msg}", file=sys.stderr, flush=True)


def run_size(size: Size, base: str, args: argparse.Namespace) -> Result:
    res = Result(size)
    f = res.figures
    msgs = size.sessions * size.messages
    repeat = args.repeat or (3 if msgs <= 300_000 else 2 if msgs <= 3_000_000 else 1)
    if args.quick:
        repeat = 1
    f["repeat"] = repeat

    log(f"{size.name}: generating")
    t, data = timed(lambda: generate(size))
    f["generate"] = t
    f["messages"] = sum(len(s["messages"]) for _, s in data.pairs)
    gc.collect()
    gc.freeze()  # the plain sessions live all along: keep the collector from walking them during the store's work

    state, key_path, master = make_state(base, size.name)
    legacy = os.path.join(base, size.name, "sessions.json")
    store = Store.open(state, master, StoreOptions())
    try:
        changer = Changer(store, data, SEED + 1)

        log(f"{size.name}: import (full base snapshot from plain sessions)")
        f["import"], _ = timed(lambda: store.import_sessions(data.pairs))
        f["snapshot_bytes_import"] = dir_bytes(state, "snapshot")
        f["full_cold"], _ = timed(lambda: store.snapshot(full=True))

        f["seed_save"], f["full_all"] = [], []
        for r in range(repeat):
            log(f"{size.name}: seed save {r + 1}/{repeat}")
            t, f["legacy_bytes"] = seed_save(data.pairs, legacy)
            f["seed_save"].append(t)
            if size.limited:
                continue
            log(f"{size.name}: changing every session, full snapshot {r + 1}/{repeat}")
            changer.change(data.phones)
            t, _ = timed(lambda: store.snapshot(full=True))
            f["full_all"].append(t)
        f["snapshot_bytes"] = dir_bytes(state, "snapshot")

        if not size.limited:
            f["delta"], f["delta_kinds"] = [], []
            for r in range(max(3, repeat)):
                log(f"{size.name}: 1% changed, snapshot {r + 1}")
                changer.change(changer.some(0.01))
                deltas = store.stats()["deltas"]
                t, _ = timed(store.snapshot)
                f["delta"].append(t)
                f["delta_kinds"].append("delta" if store.stats()["deltas"] == deltas + 1 else "full")
            f["delta_bytes"] = os.path.getsize(os.path.join(state, f"snapshot.g{store.generation:06d}.enc"))
            left = changer.some(0.01)
            changer.change(left)  # left in the journal: open replays it
            f["replayed_records"] = len(left)
        f["chain"] = store.stats()["deltas"] + 1
        f["journal_bytes"] = dir_bytes(state, "journal")
        store.close()

        # the baseline reads exactly what the store holds
        log(f"{size.name}: writing the legacy file of the same data")
        f["seed_save"].append(seed_save(data.pairs, legacy)[0])
        f["compact_bytes"] = len(orjson.dumps(data.pairs))

        f["open_store"], f["open_json"], f["rss_store"], f["rss_json"] = [], [], [], []
        for r in range(repeat):
            log(f"{size.name}: open in fresh processes {r + 1}/{repeat}")
            a = run_child("time-store", state, key_path, legacy)
            b = run_child("time-json", state, key_path, legacy)
            assert a["count"] == b["count"] == size.sessions, (a, b)
            f["open_store"].append(a["seconds"])
            f["open_json"].append(b["seconds"])
            f["rss_store"].append(a["rss"])
            f["rss_json"].append(b["rss"])
        f["open_json_nogc"] = run_child("time-json-nogc", state, key_path, legacy)["seconds"]
        log(f"{size.name}: memory (tracemalloc) in fresh processes")
        f["mem_store"] = run_child("mem-store", state, key_path, legacy)
        f["mem_json"] = run_child("mem-json", state, key_path, legacy)

        if not size.limited:
            t, store = timed(lambda: Store.open(state, master, StoreOptions()))
            changer.store = store
            f["open_main"] = t
            asyncio.run(loop_part(store, changer, data, f, args))
    finally:
        store.close()  # idempotent: already closed on the normal path
        gc.unfreeze()  # `data` goes with this frame; main() collects
        shutil.rmtree(os.path.join(base, size.name))
    return res


async def loop_part(store: Store, changer: Changer, data: Data, f: dict[str, Any], args: argparse.Namespace) -> None:
    name = f"{len(data.phones)} sessions"
    # Noise only ever adds lateness (another process, the hypervisor): each stall is measured `repeat` times and the
    # smallest maximum is the figure, next to the idle ticker's own worst lateness (the machine's noise floor).
    f["stall_idle"], f["stall_delta"], f["stall_full"] = [], [], []
    for r in range(f["repeat"]):
        log(f"{name}: ticker with nothing running, 1 s ({r + 1}/{f['repeat']})")
        f["stall_idle"].append(await measure_stall(lambda: asyncio.sleep(1.0)))
        log(f"{name}: snapshot_async after 1% changed ({r + 1}/{f['repeat']})")
        changer.change(changer.some(0.01), mirror=False)
        f["stall_delta"].append(await measure_stall(store.snapshot_async))
        log(f"{name}: snapshot_async(full=True) after every session changed ({r + 1}/{f['repeat']})")
        changer.change(data.phones, mirror=False)
        f["stall_full"].append(await measure_stall(lambda: store.snapshot_async(full=True)))
    log(f"{name}: sync snapshot(full=True) after every session changed, under the ticker (the loop without snapshot_async)")
    changer.change(data.phones, mirror=False)

    async def sync_full() -> None:
        store.snapshot(full=True)

    f["stall_sync"] = await measure_stall(sync_full)
    log(f"{name}: journal, {args.writers} writers for {args.journal_seconds:g} s")
    f["journal"] = await journal_run(store, data, args.writers, args.journal_seconds)
    log(f"{name}: journal, {args.writers} writers each on its own (hot) session")
    f["journal_own"] = await journal_run(store, data, args.writers, args.journal_seconds, own=True)
    await store.aclose()


# ---- reporting ----


def fmt_s(t: float) -> str:
    if t < 1e-3:
        return f"{t * 1e6:.0f} us"
    if t < 1:
        return f"{t * 1e3:.1f} ms"
    return f"{t:.2f} s"


def fmt_b(n: float) -> str:
    return f"{n / 1e6:,.1f} MB" if n >= 1e5 else f"{n / 1e3:,.1f} kB"


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def stall(f: dict[str, Any], key: str) -> float:
    """The smallest of the runs' longest stalls (noise only adds to a stall)."""
    return float(min(run["stall"] for run in f[key]))


@dataclass
class Row:
    key: str
    measure: str
    ours: str
    base: str
    ratio: float | None
    target: str
    ok: bool | None  # None: no target


def rows_for(res: Result) -> list[Row]:
    f = res.figures
    rows: list[Row] = []
    seed = med(f["seed_save"])
    if f.get("full_all"):
        full = med(f["full_all"])
        rows.append(
            Row(
                "1",
                "full durable snapshot, every session changed",
                fmt_s(full),
                fmt_s(seed),
                full / seed,
                "<= 0.25x",
                full / seed <= 0.25,
            )
        )
    if f.get("delta"):
        d = med(f["delta"])
        rows.append(
            Row("2", "snapshot after 1% of sessions changed", fmt_s(d), fmt_s(seed), d / seed, "<= 0.03x", d / seed <= 0.03)
        )
    so, jo = med(f["open_store"]), med(f["open_json"])
    rows.append(Row("3", "open (Store.open) vs json.load", fmt_s(so), fmt_s(jo), so / jo, "<= 0.5x", so / jo <= 0.5))
    jn = f["open_json_nogc"]
    rows.append(Row("3b", "  vs json.load with the collector off", fmt_s(so), fmt_s(jn), so / jn, "(info)", None))
    ms, mj, c = f["mem_store"]["traced"], f["mem_json"]["traced"], f["compact_bytes"]
    rows.append(Row("4", "memory held / compact JSON size", fmt_b(ms), fmt_b(c), ms / c, "<= 1.5x", ms / c <= 1.5))
    rows.append(Row("4b", "  plain dicts (json.load) / compact JSON", fmt_b(mj), fmt_b(c), mj / c, "(info)", None))
    if "stall_delta" in f:
        delta, full_ = stall(f, "stall_delta"), stall(f, "stall_full")
        rows.append(Row("5a", "loop stall, snapshot_async after 1% changed", fmt_s(delta), "-", None, "<= 50 ms", delta <= 0.05))
        rows.append(
            Row(
                "5b",
                "loop stall, snapshot_async(full) all changed",
                fmt_s(full_),
                fmt_s(f["stall_sync"]["stall"]),
                full_ / f["stall_sync"]["stall"],
                "<= 50 ms",
                full_ <= 0.05,
            )
        )
    if "journal" in f:
        j = f["journal"]
        rows.append(
            Row(
                "6",
                "journal: durable records/s, 64 writers",
                f"{j['rate']:,.0f}/s",
                "-",
                None,
                ">= 20,000/s",
                j["rate"] >= 20_000,
            )
        )
        jo = f["journal_own"]
        rows.append(Row("6b", "  same, each writer on its own hot session", f"{jo['rate']:,.0f}/s", "-", None, "(info)", None))
    return rows


def print_size(res: Result, verdicts: bool) -> None:
    s, f = res.size, res.figures
    print()
    print(
        f"=== {s.name}: {s.sessions:,} sessions, {f['messages']:,} messages (generated in {fmt_s(f['generate'])}); "
        f"compact JSON {fmt_b(f['compact_bytes'])}, legacy file {fmt_b(f['legacy_bytes'])}; median of {f['repeat']} ==="
    )
    print(f"{'row':4} {'measure':47} {'natalia-secure':>15} {'baseline':>12} {'ratio':>8}  {'target':12} {'':4}")
    for r in rows_for(res):
        ratio = f"{r.ratio:.3f}x" if r.ratio is not None else "-"
        verdict = ("PASS" if r.ok else "MISS") if verdicts and r.ok is not None else ""
        print(f"{r.key:4} {r.measure:47} {r.ours:>15} {r.base:>12} {ratio:>8}  {r.target:12} {verdict:4}")
    print("  details:")
    print(f"    seed save runs: {', '.join(fmt_s(x) for x in f['seed_save'])}")
    print(
        f"    import_sessions (encode every session from dicts + seal + write + fsync): {fmt_s(f['import'])}, "
        f"snapshot {fmt_b(f['snapshot_bytes_import'])}"
    )
    print(
        f"    snapshot(full=True) with nothing changed (concatenate cold bytes + seal + write + fsync): {fmt_s(f['full_cold'])}"
    )
    if f.get("full_all"):
        print(
            f"    snapshot(full=True) after every session changed, runs: {', '.join(fmt_s(x) for x in f['full_all'])}; "
            f"base snapshot {fmt_b(f['snapshot_bytes'])} ({f['snapshot_bytes'] / f['legacy_bytes']:.2f}x the legacy file)"
        )
    if f.get("delta"):
        print(
            f"    snapshot() after 1% changed, runs: {', '.join(fmt_s(x) for x in f['delta'])} ({', '.join(f['delta_kinds'])}); "
            f"last delta {fmt_b(f['delta_bytes'])}"
        )
    print(
        f"    open: chain of {f['chain']} snapshot file(s) + {f.get('replayed_records', 0):,} journal records "
        f"({fmt_b(f['journal_bytes'])}); Store.open runs {', '.join(fmt_s(x) for x in f['open_store'])}; "
        f"json.load runs {', '.join(fmt_s(x) for x in f['open_json'])}"
    )
    ms, mj = f["mem_store"], f["mem_json"]
    print(
        f"    memory: store traced {fmt_b(ms['traced'])} (peak during open +{fmt_b(ms['peak'])}), "
        f"RSS +{fmt_b(med(f['rss_store']))}; "
        f"dicts traced {fmt_b(mj['traced'])} (peak +{fmt_b(mj['peak'])}), RSS +{fmt_b(med(f['rss_json']))}"
    )
    if "stall_delta" in f:
        for key, what in (
            ("stall_idle", "idle ticker, 1 s"),
            ("stall_delta", "snapshot_async, 1% changed"),
            ("stall_full", "snapshot_async(full=True), all changed"),
            ("stall_sync", "sync snapshot(full=True), all changed"),
        ):
            for st in f[key] if isinstance(f[key], list) else [f[key]]:
                print(
                    f"    loop: {what}: longest stall {fmt_s(st['stall'])}, took {fmt_s(st['elapsed'])}, {st['ticks']} ticks; "
                    f"gc {fmt_s(st['gc_total'])} in all, {st['gc_full']} full, longest pause {fmt_s(st['gc_longest'])}; "
                    f"VM steal {fmt_s(st['steal'])}"
                )
    for key, what in (("journal", "random phones"), ("journal_own", "own phone each")):
        if key in f:
            j = f[key]
            print(
                f"    journal ({what}): {j['records']:,} records in {fmt_s(j['elapsed'])} = {j['rate']:,.0f}/s; "
                f"{j['fsyncs']:,} fsyncs, "
                f"{j['per_fsync']:.1f} records/fsync; add+wait latency p50 {fmt_s(j['p50'])}, p99 {fmt_s(j['p99'])}; "
                f"gc {fmt_s(j['gc_total'])} in all, {j['gc_full']} full, longest pause {fmt_s(j['gc_longest'])}; "
                f"VM steal {fmt_s(j['steal'])}"
            )
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", help=f"comma-separated N[k|M][xMESSAGES] (default {DEFAULT_SIZES}; x20 if omitted)")
    p.add_argument("--all", action="store_true", help=f"also {ALL_EXTRA} (save, open, memory)")
    p.add_argument("--quick", action="store_true", help=f"smoke run, seconds ({QUICK_SIZES}, one repetition)")
    p.add_argument("--state-dir", help="where the temporary state goes (default /var/tmp or /work, never a tmpfs)")
    p.add_argument("--repeat", type=int, default=0, help="repetitions of the timed saves and opens (default by size)")
    p.add_argument("--writers", type=int, default=64, help="concurrent journal writers (row 6)")
    p.add_argument("--journal-seconds", type=float, default=None, help="row 6 duration (default 4, quick 0.5)")
    args = p.parse_args(argv)
    spec = args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)
    if args.all:
        spec += "," + ALL_EXTRA
    sizes = [parse_size(s) for s in spec.split(",") if s.strip()]
    args.journal_seconds = args.journal_seconds or (0.5 if args.quick else 4.0)

    parent = args.state_dir or default_base()
    os.makedirs(parent, exist_ok=True)
    if fs_of(parent).startswith("tmpfs"):
        print(f"warning: {parent} is a tmpfs: fsync costs nothing there, the figures flatter the store", file=sys.stderr)
    base = tempfile.mkdtemp(prefix="natalia-bench-", dir=parent)
    print("natalia-secure store benchmark (bench/store.py; bench/README.md explains every row)")
    from cryptography.hazmat.backends.openssl.backend import backend

    software = f"cryptography {cryptography.__version__} ({backend.openssl_version_text()}), orjson {orjson.__version__}"
    for line in machine(software):
        print(line)
    print(f"state      {base} ({fs_of(base)}), deleted at the end")
    print(f"command    {' '.join([os.path.relpath(sys.executable), 'bench/store.py', *argv])}")
    print(
        "baseline   the seed's way: json.dumps(pairs, indent=2, ensure_ascii=False) + write, plaintext, no fsync "
        "(= JSON.stringify(pairs, null, 2)); json.load of that file"
    )
    sys.stdout.flush()
    results = []
    started = time.perf_counter()
    try:
        for size in sizes:
            res = run_size(size, base, args)
            gc.collect()
            results.append(res)
            print_size(res, verdicts=size.name == TARGET_SIZE)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    summary(results)
    print(f"\ntotal {fmt_s(time.perf_counter() - started)}; load at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


def summary(results: list[Result]) -> None:
    big = [r for r in results if r.size.name in ("10kx250", "1Mx2")]
    if big:
        print("\n=== row 7: large shapes (save = full snapshot; open in a fresh process) ===")
        print(
            f"{'size':9} {'import':>9} {'full, all changed':>18} {'full, cold':>11} {'open':>9} {'json.load':>10} "
            f"{'seed save':>10} {'snapshot':>10} {'legacy':>10} {'compact':>10} {'mem/compact':>11}"
        )
        for r in big:
            f = r.figures
            full = fmt_s(med(f["full_all"])) if f.get("full_all") else "-"
            print(
                f"{r.size.name:9} {fmt_s(f['import']):>9} {full:>18} {fmt_s(f['full_cold']):>11} "
                f"{fmt_s(med(f['open_store'])):>9} "
                f"{fmt_s(med(f['open_json'])):>10} {fmt_s(med(f['seed_save'])):>10} {fmt_b(f['snapshot_bytes']):>10} "
                f"{fmt_b(f['legacy_bytes']):>10} {fmt_b(f['compact_bytes']):>10} "
                f"{f['mem_store']['traced'] / f['compact_bytes']:>10.2f}x"
            )
    target = next((r for r in results if r.size.name == TARGET_SIZE), None)
    note = ""
    if target is None:
        candidates = [r for r in results if not r.size.limited]
        if not candidates:
            return
        target = max(candidates, key=lambda r: r.size.sessions * r.size.messages)
        note = f" (indicative only: the targets are for {TARGET_SIZE})"
    print(f"\n=== targets at {target.size.name}{note} ===")
    for row in rows_for(target):
        if row.ok is None or row.key == "5a":
            continue
        label = {"5b": "5   loop stall while snapshot_async runs (worst of 1% and all changed)"}.get(
            row.key, f"{row.key:3} {row.measure}"
        )
        figure = f"{row.ratio:.3f}x" if row.key in ("1", "2", "3", "4") else row.ours
        ok = row.ok
        if row.key == "5b":
            worst = max(stall(target.figures, "stall_delta"), stall(target.figures, "stall_full"))
            figure, ok = fmt_s(worst), worst <= 0.05
            figure += f" (idle floor {fmt_s(stall(target.figures, 'stall_idle'))})"
        print(f"{'PASS' if ok else 'MISS'}  {label:75} {figure:>12}  target {row.target}")


if __name__ == "__main__":
    sys.exit(main())
