"""Webhook throughput and acknowledgement latency of `natalia-secure serve` next to a bare Tornado handler, one run.

A load generator in its own process sends unique, correctly signed WhatsApp webhook bodies over loopback on many
keep-alive connections to a bare Tornado handler that answers 200 `{}` after reading the body (the ceiling of a
single-process Tornado server on this machine, on the daemon's event loop, uvloop) and to the real daemon
(`python -m natalia_secure serve`, which answers 200 only once the message is sealed and fsynced), alternating which
goes first round by round. Closed loop first (every connection sends its next request as soon as the answer is in:
the throughput), then open loop at a fixed rate well below saturation (the latency a steady stream of customers
sees). The machine is a shared, noisy 2-CPU VM and the generator shares its cores with the server measured: read the
ratio, not the absolute figures (bench/README.md, section "bench/webhook.py").

    .venv/bin/python bench/webhook.py                            # 3 rounds x 20,000 requests, 64 connections (~3 min)
    .venv/bin/python bench/webhook.py --quick                    # 1 round x 3,000 requests, ~25 s
    .venv/bin/python bench/webhook.py --durability interval      # the daemon with NATALIA_DURABILITY=interval
    .venv/bin/python bench/webhook.py --log-level warning        # the daemon without its info lines (what logging costs)
    .venv/bin/python bench/webhook.py --profile /var/tmp/serve.prof  # the daemon under cProfile (figures not judged)

Targets (issue 3): serve >= 0.5x the bare handler's requests/s with p99 <= 25 ms; Meta asks a median <= 250 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import json
import os
import pstats
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from typing import IO, Any

import uvloop
from benchlib import default_base, fs_of, machine

from natalia_secure import keyring, masterkey, whatsapp
from natalia_secure.clock import iso_utc, now_ms

SECRET = "bench-app-secret"  # noqa: S105  (made up: the daemon under test is started with it, nothing else uses it)
TOKEN = "bench-verify-token"  # noqa: S105  (made up, as above)
SEED = 20260311
T0_S = 1_770_000_000  # Feb 2026, the message timestamps Meta would send
TARGET_RATIO = 0.5
TARGET_P99_S = 0.025
META_P50_S = 0.250
TEXT_BITS = [
    "Hola",
    "Buenas tardes",
    "¿Cuál es el horario? 🕐",
    "Quiero fotos de salado",
    "¿Tienen envío a domicilio?",
    "¿Cuánto cuesta la docena de empanadas?",
    "Me gustaría reservar una mesa para cuatro personas el sábado",
    "¿Aceptan tarjeta o sólo efectivo?",
    "No me llegó el pedido de ayer 😕",
    "Gracias 😊",
]

# ---- the bare handler (child process) ----


def bare_main() -> int:
    """A single-process Tornado server whose POST /webhook reads the body and answers 200 `{}`, nothing else."""
    import tornado.httpserver
    import tornado.netutil
    import tornado.web

    class Bare(tornado.web.RequestHandler):
        def post(self) -> None:  # Tornado has read the whole body before post() runs
            self.finish(b"{}")

    async def serve() -> None:
        app = tornado.web.Application([("/webhook", Bare)], log_function=lambda handler: None)
        server = tornado.httpserver.HTTPServer(app)
        sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
        server.add_sockets(sockets)
        print(sockets[0].getsockname()[1], flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        server.stop()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:  # the daemon's loop (daemon.serve)
        runner.run(serve())
    return 0


# ---- the load generator (child process) ----


def build_requests(port: int, tag: str, count: int, senders: int, seed: int) -> list[bytes]:
    """`count` complete HTTP/1.1 requests, each a signed webhook with one text message and a wamid of its own."""
    rng = random.Random(seed)
    secret = SECRET.encode()
    out = []
    for i in range(count):
        phone = f"1555{rng.randrange(senders):07d}"  # the fictional 555 range: no real number
        text = " ".join(rng.choice(TEXT_BITS) for _ in range(rng.randint(2, 6)))
        body = whatsapp.text_webhook([(f"wamid.bench-{tag}-{i:08d}", phone, text, T0_S + i)])
        head = (
            f"POST /webhook HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"{whatsapp.SIGNATURE_HEADER}: {whatsapp.sign(secret, body)}\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        out.append(head.encode() + body)
    return out


async def read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    m = re.search(rb"\r\ncontent-length:\s*(\d+)", head, re.IGNORECASE)
    if m is None:
        raise ValueError("response without Content-Length")
    await reader.readexactly(int(m.group(1)))
    return status


async def drive(port: int, requests: list[bytes], connections: int, rate: float) -> dict[str, Any]:
    """Send every request once over `connections` keep-alive connections; closed loop (each connection sends its
    next request when the previous answer is in) unless `rate` > 0: then request i is due at start + i/rate and its
    latency counts from that moment, so a server that falls behind is charged for the wait (no coordinated
    omission)."""
    latencies = [0.0] * len(requests)
    statuses: dict[int, int] = {}
    broken = 0
    counter = itertools.count()
    start = time.perf_counter()

    async def worker() -> None:
        nonlocal broken
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while (i := next(counter)) < len(requests):
                if rate:
                    due = start + i / rate
                    if (delay := due - time.perf_counter()) > 0:
                        await asyncio.sleep(delay)
                    sent = due
                else:
                    sent = time.perf_counter()
                writer.write(requests[i])
                try:
                    status = await read_response(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    broken += 1
                    status = 0
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                latencies[i] = time.perf_counter() - sent
                statuses[status] = statuses.get(status, 0) + 1
        finally:
            writer.close()

    cpu = time.process_time()
    await asyncio.gather(*(worker() for _ in range(connections)))
    return {
        "elapsed": time.perf_counter() - start,
        "cpu": time.process_time() - cpu,
        "latencies": latencies,
        "statuses": {str(k): v for k, v in statuses.items()},
        "broken": broken,
    }


def load_main(spec_json: str) -> int:
    """Child: build the requests, warm up, print "ready", wait for "go" on stdin, run, print the result as JSON."""
    spec = json.loads(spec_json)
    port, tag = spec["port"], spec["tag"]
    warm = build_requests(port, tag + "w", spec["warmup"], spec["senders"], spec["seed"] + 1)
    timed = build_requests(port, tag, spec["count"], spec["senders"], spec["seed"])

    async def run() -> dict[str, Any]:
        await drive(port, warm, spec["connections"], 0.0)
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        return await drive(port, timed, spec["connections"], spec["rate"])

    print(json.dumps(asyncio.run(run())), flush=True)
    return 0


# ---- measurements the parent takes ----


def proc_cpu(pid: int) -> tuple[float, float]:
    """(CPU seconds of the whole process, of its main thread), from /proc (proc(5): utime + stime, in clock ticks)."""
    tick = os.sysconf("SC_CLK_TCK")

    def read(path: str) -> float:
        with open(path) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / tick

    return read(f"/proc/{pid}/stat"), read(f"/proc/{pid}/task/{pid}/stat")


def steal_s() -> float:
    """CPU time the hypervisor gave to others (/proc/stat "steal", all CPUs)."""
    with open("/proc/stat") as f:
        return int(f.readline().split()[8]) / os.sysconf("SC_CLK_TCK")


Samples = dict[str, float]


def scrape(port: int) -> Samples:
    """Every sample of the daemon's /metrics, keyed by name with its labels as printed."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        text = r.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples


def diff(after: Samples, before: Samples) -> Samples:
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def total(samples: Samples, name: str) -> float:
    """Sum of a metric over its labels (e.g. natalia_messages_received_total{kind=...})."""
    return sum(v for k, v in samples.items() if k == name or k.startswith(name + "{"))


def histogram_quantile(samples: Samples, name: str, q: float) -> tuple[float, float, float] | None:
    """Prometheus' histogram_quantile: linear inside the bucket that holds the q-quantile; (estimate, lo, hi)."""
    buckets = []
    for key, count in samples.items():
        m = re.fullmatch(re.escape(name) + r'_bucket\{le="([^"]+)"\}', key)
        if m:
            buckets.append((float(m.group(1)), count))
    buckets.sort()
    n = samples.get(name + "_count", 0.0)
    if not buckets or n <= 0:
        return None
    rank, lo, below = q * n, 0.0, 0.0
    for bound, cumulative in buckets:
        if cumulative >= rank:
            if bound == float("inf"):
                return lo, lo, bound
            return lo + (bound - lo) * (rank - below) / max(cumulative - below, 1e-9), lo, bound
        lo, below = bound, cumulative
    return None


# ---- orchestration ----


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[str]
    port: int
    runs: list[dict[str, Any]] = field(default_factory=list)


def wait_ready(proc: subprocess.Popen[str], log_path: str, port: int, timeout: float = 60.0) -> int:
    """The daemon's port once it serves: from its `listening` JSON log event, or (port given: a log level above
    info hides that event) once GET /healthz answers 200."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if port:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
                    if r.status == 200:
                        return port
            except OSError:
                pass
        else:
            with open(log_path) as f:
                for line in f:
                    if '"listening"' in line:
                        return int(json.loads(line)["port"])
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    with open(log_path) as f:
        tail = f.readlines()[-20:]
    raise SystemExit(f"the daemon did not start (exit {proc.poll()}):\n" + "".join(tail))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def daemon_env(base: str, port: int, durability: str = "always", log_level: str = "info") -> dict[str, str]:
    """A fresh state directory under `base` (what `natalia-secure keys init` leaves) and the environment that points
    `python -m natalia_secure serve` at it, listening on 127.0.0.1:`port` (0: any), with the benchmark's secrets."""
    state = os.path.join(base, "state")
    os.mkdir(state, 0o700)
    key_file = os.path.join(base, "master.key")
    master = masterkey.create_key_file(key_file)
    now = now_ms()
    keyring.save(state, keyring.Keyring.new(iso_utc(now)), master, now)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NATALIA_", "WHATSAPP_", "NOTIFY_", "WATCHDOG_"))}
    env.update(
        NATALIA_STATE_DIR=state,
        NATALIA_MASTER_KEY_FILE=key_file,
        NATALIA_LISTEN=f"127.0.0.1:{port}",
        NATALIA_LOG_FORMAT="json",
        NATALIA_DURABILITY=durability,
        NATALIA_LOG_LEVEL=log_level,
        WHATSAPP_APP_SECRET=SECRET,
        WHATSAPP_VERIFY_TOKEN=TOKEN,
        PYTHONUNBUFFERED="1",
    )
    return env


def start_daemon(base: str, args: argparse.Namespace, log: IO[str]) -> Server:
    port = 0 if args.log_level in ("debug", "info") else free_port()
    env = daemon_env(base, port, args.durability, args.log_level)
    profile = ["-m", "cProfile", "-o", args.profile] if args.profile else []
    proc = subprocess.Popen(
        [sys.executable, *profile, "-m", "natalia_secure", "serve"], env=env, stdout=log, stderr=subprocess.STDOUT, text=True
    )
    try:
        return Server("natalia serve", proc, wait_ready(proc, log.name, port))
    except BaseException:  # not yet a Server main() would stop: never leave it running
        proc.kill()
        proc.wait()
        raise


def start_bare() -> Server:
    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--bare-child"], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.strip().isdigit():
        proc.kill()
        proc.wait()
        raise SystemExit(f"the bare server did not start (exit {proc.poll()})")
    return Server("bare Tornado 200", proc, int(line))


def run_load(server: Server, tag: str, args: argparse.Namespace, rate: float, daemon: Server) -> dict[str, Any]:
    """One generator process against `server`: warm-up, then the timed requests; CPU, steal and (for the daemon)
    /metrics read just before and after the timed part."""
    spec = {
        "port": server.port,
        "tag": tag,
        "count": args.requests,
        "warmup": args.warmup,
        "connections": args.connections,
        "senders": args.senders,
        "seed": SEED + tag_number(tag),
        "rate": rate,
    }
    child = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--load-child", json.dumps(spec)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        if child.stdout.readline().strip() != "ready":
            raise SystemExit(f"the load generator failed during warm-up (exit {child.wait()})")
        if server is daemon:
            wait_replies(daemon.port)  # the replies to earlier messages are not this window's work
        before = scrape(daemon.port)
        cpu0, steal0 = proc_cpu(server.proc.pid), steal_s()
        child.stdin.write("go\n")
        child.stdin.flush()
        line = child.stdout.readline()
        if not line:
            raise SystemExit(f"the load generator failed (exit {child.wait()})")
        result: dict[str, Any] = json.loads(line)
        cpu1, steal1 = proc_cpu(server.proc.pid), steal_s()
        after = scrape(daemon.port)
        if child.wait() != 0:
            raise SystemExit(f"the load generator failed (exit {child.returncode})")
    finally:
        if child.poll() is None:  # the parent failed first: the generator must not outlive it
            child.kill()
            child.wait()
    result["server_cpu"] = cpu1[0] - cpu0[0]
    result["server_main_cpu"] = cpu1[1] - cpu0[1]
    result["steal"] = steal1 - steal0
    result["metrics"] = diff(after, before)
    result["rate"] = rate
    result["sent"] = args.requests + args.warmup
    return result


def tag_number(tag: str) -> int:
    """A stable small number from a tag (the seed of its bodies), independent of PYTHONHASHSEED."""
    return int.from_bytes(hashlib.sha256(tag.encode()).digest()[:4], "big")


# ---- reporting ----


def fmt_s(t: float) -> str:
    return f"{t * 1e3:.1f} ms" if t < 10 else f"{t:.1f} s"


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


@dataclass
class Figures:
    rps: float
    p50: float
    p99: float
    worst: float
    errors: int


def figures(runs: list[dict[str, Any]]) -> Figures:
    """The median round's requests/s; latency percentiles over every request of every round; errors summed."""
    lat = [x for r in runs for x in r["latencies"]]
    errors = sum(v for r in runs for k, v in r["statuses"].items() if k != "200")
    return Figures(
        statistics.median(len(r["latencies"]) / r["elapsed"] for r in runs), pct(lat, 0.5), pct(lat, 0.99), max(lat), errors
    )


def table(title: str, bare: list[dict[str, Any]], serve: list[dict[str, Any]]) -> tuple[Figures, Figures]:
    b, s = figures(bare), figures(serve)
    print(f"\n=== {title} ===")
    print(f"{'server':18} {'requests/s':>11} {'p50':>9} {'p99':>9} {'max':>9} {'errors':>7}")
    for name, f in (("bare Tornado 200", b), ("natalia serve", s)):
        print(f"{name:18} {f.rps:>11,.0f} {fmt_s(f.p50):>9} {fmt_s(f.p99):>9} {fmt_s(f.worst):>9} {f.errors:>7}")
    print(f"{'ratio serve/bare':18} {s.rps / b.rps:>10.3f}x {s.p50 / b.p50:>8.2f}x {s.p99 / b.p99:>8.2f}x")
    return b, s


def details(server: str, runs: list[dict[str, Any]], connections: int) -> None:
    for i, r in enumerate(runs):
        n = len(r["latencies"])
        rps = n / r["elapsed"]
        lat = r["latencies"]
        print(
            f"    {server} round {i + 1}: {n:,} in {fmt_s(r['elapsed'])} = {rps:,.0f}/s; p50 {fmt_s(pct(lat, 0.5))}, "
            f"p99 {fmt_s(pct(lat, 0.99))}; statuses {r['statuses']}, reconnects {r['broken']}; "
            f"server CPU {r['server_cpu']:.2f} s ({r['server_cpu'] / r['elapsed']:.0%} of a core, main thread "
            f"{r['server_main_cpu']:.2f} s = {r['server_main_cpu'] / n * 1e6:,.0f} us/request), "
            f"generator CPU {r['cpu']:.2f} s ({r['cpu'] / r['elapsed']:.0%}), VM steal {r['steal']:.2f} s"
            + (
                f"; Little's law: {connections} connections / {rps:,.0f}/s = {fmt_s(connections / rps)} mean"
                if not r["rate"]
                else ""
            )
        )


def daemon_view(runs: list[dict[str, Any]]) -> None:
    """What the daemon's own /metrics say about the timed parts (differences of the counters around each)."""
    m: Samples = {}
    for r in runs:
        for k, v in r["metrics"].items():
            m[k] = m.get(k, 0.0) + v
    n = sum(len(r["latencies"]) for r in runs)
    acks = m.get("natalia_ack_latency_seconds_count", 0.0)
    fsyncs = m.get("natalia_journal_fsync_seconds_count", 0.0)
    received = total(m, "natalia_messages_received_total")
    replies = total(m, "natalia_replies_total")
    parts = []
    for q in (0.5, 0.99):
        est = histogram_quantile(m, "natalia_ack_latency_seconds", q)
        if est:
            parts.append(f"p{q * 100:.0f} ~{fmt_s(est[0])} (bucket {fmt_s(est[1])}-{fmt_s(est[2])})")
    fsync_mean = m.get("natalia_journal_fsync_seconds_sum", 0.0) / fsyncs if fsyncs else 0.0
    print(
        f"    daemon /metrics: {acks:,.0f} acks, body-to-durable-200 {', '.join(parts) or '-'}; "
        f"{received:,.0f} messages received, {replies:,.0f} replies written"
    )
    if fsyncs:
        print(
            f"    daemon journal: {fsyncs:,.0f} group commits (write + fsync, mean {fmt_s(fsync_mean)}) for {n:,} requests = "
            f"{n / fsyncs:.1f} requests per fsync ({(received + replies) / fsyncs:.1f} records: messages + replies)"
        )


def verdict(ok: bool, label: str, figure: str, judged: bool) -> None:
    print(f"{('PASS' if ok else 'FAIL') if judged else 'info':4}  {label:52} {figure:>12}")


def stop(server: Server, timeout: float = 30.0) -> int | None:
    """SIGTERM and the exit code; SIGKILL (and None) if it does not stop in time."""
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
    try:
        return server.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()
        return None


def wait_replies(port: int, timeout: float = 60.0) -> float:
    """Wait until the daemon has answered every accepted message (natalia_replies_pending 0); what is left."""
    end = time.monotonic() + timeout
    pending = 0.0
    while time.monotonic() < end:
        pending = scrape(port).get("natalia_replies_pending", 0.0)
        if pending == 0:
            break
        time.sleep(0.1)
    return pending


def area(filename: str, function: str) -> str:
    """Which part of the daemon a profiled function belongs to."""
    if "structlog" in filename or "/logging/" in filename or filename.endswith(("natalia_secure/logs.py", "json/encoder.py")):
        return "logging (structlog, stdlib logging, json)"
    for part, name in (("prometheus_client", "metrics (prometheus_client)"), ("tornado", "tornado"), ("asyncio", "asyncio")):
        if part in filename:
            return name
    if "natalia_secure" in filename:
        return "natalia_secure/" + os.path.basename(filename)
    return "builtins and C extensions" if filename == "~" else "other Python"


# (label, file the function is in, function): cumulative time per request, so the rows overlap where nested
PATHS = (
    ("every log line: structlog, stdlib logging, JSON, write", "structlog/_base.py", "_proxy_to_logger"),
    ("  the access line (logs.log_access)", "natalia_secure/logs.py", "log_access"),
    ("POST /webhook after its body (web.py WebhookPost._accept)", "natalia_secure/web.py", "_accept"),
    ("  intake: verify, parse, claim, append, durable wait", "natalia_secure/intake.py", "_accept"),
    ("the reply worker, all of it (replies.py _work)", "natalia_secure/replies.py", "_work"),
    ("store.get: a copy of a whole session (orjson round trip)", "natalia_secure/store.py", "get"),
    ("HTTP/1.1: read and parse a request (tornado)", "tornado/http1connection.py", "_read_message"),
    ("HTTP: write the answer (web.py WebhookPost._answer)", "natalia_secure/web.py", "_answer"),
)


def print_profile(path: str, top: int = 20) -> None:
    """Own time by area (waiting in epoll left out: it is idle time), cumulative time of the main paths per
    request, then the functions with the most own time."""
    stats = pstats.Stats(path, stream=sys.stdout)
    raw = stats.stats  # type: ignore[attr-defined]
    areas: dict[str, float] = {}
    for (filename, _, function), (_, _, own, *_rest) in raw.items():
        if "poll' of 'select.epoll" not in function:
            key = area(filename, function)
            areas[key] = areas.get(key, 0.0) + own
    busy = sum(areas.values())
    # WebhookPost.headers_received runs once per POST (a coroutine counts once per resumption)
    requests = max(
        (v[1] for (f, _, fn), v in raw.items() if f.endswith("natalia_secure/web.py") and fn == "headers_received"), default=0
    )
    print(f"\n=== the daemon under cProfile ({path}; main thread only; cProfile inflates Python calls: read shares) ===")
    print(f"busy {busy:.2f} s of own time (epoll waits left out) for {requests:,} requests, by area:")
    for key, own in sorted(areas.items(), key=lambda kv: -kv[1])[:12]:
        print(f"  {own / busy:6.1%}  {own:7.2f} s  {key}")
    if requests:
        print("main paths, cumulative (nested rows are part of the row above them):")
        for label, suffix, function in PATHS:
            found = [v for (f, _, fn), v in raw.items() if f.endswith(suffix) and fn == function]
            if not found:
                print(f"  {'-':>6}  {'-':>7}             {label}: not in this profile (renamed?)")
                continue
            cum = sum(v[3] for v in found)
            print(f"  {cum / busy:6.1%}  {cum / requests * 1e6:7.0f} us/request  {label}")
    sys.stdout.flush()
    if top:
        stats.sort_stats("tottime").print_stats(top)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--bare-child"]:
        return bare_main()
    if argv[:1] == ["--load-child"]:
        return load_main(argv[1])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 1 round of 3,000 requests, warm-up 500")
    p.add_argument("--requests", type=int, help="timed requests per round and server (default 20,000; quick 3,000)")
    p.add_argument("--warmup", type=int, help="untimed requests first, on the same connections (default 2,000; quick 500)")
    p.add_argument("--rounds", type=int, help="rounds, bare and serve alternating who goes first (default 3; quick 1)")
    p.add_argument("--connections", type=int, default=64, help="concurrent keep-alive connections (default 64)")
    p.add_argument("--senders", type=int, default=1000, help="distinct phone numbers the messages come from (default 1000)")
    p.add_argument("--rate", type=float, default=None, help="open-loop phase: requests/s offered (default a quarter of serve's)")
    p.add_argument("--durability", choices=("always", "interval"), default="always", help="NATALIA_DURABILITY for serve")
    p.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="info",
        help="NATALIA_LOG_LEVEL for serve (default info)",
    )
    p.add_argument("--state-dir", help="where the temporary state goes (default /var/tmp or /work, never a tmpfs)")
    p.add_argument("--profile", metavar="FILE", help="run the daemon under cProfile, stats to FILE (figures not judged)")
    p.add_argument(
        "--closed-only", action="store_true", help="skip the open loop (A/B runs of one change: ~1 min with --rounds 1)"
    )
    args = p.parse_args(argv)
    args.requests = args.requests or (3000 if args.quick else 20_000)
    args.warmup = args.warmup if args.warmup is not None else (500 if args.quick else 2000)
    args.rounds = args.rounds or (1 if args.quick else 3)
    if args.profile:
        args.profile = os.path.abspath(args.profile)

    parent = args.state_dir or default_base()
    os.makedirs(parent, exist_ok=True)
    base = tempfile.mkdtemp(prefix="natalia-bench-webhook-", dir=parent)
    print("natalia-secure webhook benchmark (bench/webhook.py; bench/README.md explains the columns)")
    import tornado

    for line in machine(f"Tornado {tornado.version}, servers on uvloop {uvloop.__version__}, generator on asyncio's loop"):
        print(line)
    print(f"state      {base} ({fs_of(base)}), deleted at the end; the daemon's log goes to a file there")
    print(f"command    {' '.join([os.path.relpath(sys.executable), 'bench/webhook.py', *argv])}")
    print(
        f"load       {args.rounds} round(s) x {args.requests:,} timed requests per server after {args.warmup:,} warm-up, "
        f"{args.connections} keep-alive connections, one text message per POST (unique wamid, {args.senders:,} senders), "
        "HMAC-signed; a generator process of its own (asyncio streams, pre-built requests)"
    )
    print(
        f"note       generator and server share the machine's {len(os.sched_getaffinity(0))} cores (CPU of each in the "
        "details); latency = from sending a request to its full response, per request"
    )
    print(
        f"serve      python -m natalia_secure serve, durability {args.durability}, JSON logs ({args.log_level}) to a file, "
        "OfflineAssistant + LogOutbox replies (each message also gets a reply written and fsynced)"
        + (", under cProfile" if args.profile else "")
    )
    sys.stdout.flush()

    log = open(os.path.join(base, "serve.log"), "w")
    daemon: Server | None = None
    bare: Server | None = None
    exit_code: int | None = None
    started = time.perf_counter()
    try:
        daemon = start_daemon(base, args, log)
        bare = start_bare()
        for r in range(args.rounds):
            for server in (bare, daemon) if r % 2 == 0 else (daemon, bare):
                print(f"round {r + 1}/{args.rounds}: {server.name}", file=sys.stderr, flush=True)
                server.runs.append(run_load(server, f"r{r}{server.name[0]}", args, 0.0, daemon))
        b, s = table(
            f"closed loop: {args.connections} connections sending back to back; {args.rounds} round(s) x {args.requests:,}",
            bare.runs,
            daemon.runs,
        )
        rate = args.rate or round(s.rps / 4, -1)
        print("  details:")
        details("bare ", bare.runs, args.connections)
        details("serve", daemon.runs, args.connections)
        daemon_view(daemon.runs)
        open_serve: list[dict[str, Any]] = []
        open_s: Figures | None = None
        if not args.closed_only:
            print(f"round open loop ({rate:,.0f}/s)", file=sys.stderr, flush=True)
            open_bare = [run_load(bare, "ob", args, rate, daemon)]
            open_serve = [run_load(daemon, "os", args, rate, daemon)]
            table(
                f"open loop: {rate:,.0f} requests/s offered to each (latency from the moment a request was due)",
                open_bare,
                open_serve,
            )
            print("  details:")
            details("bare ", open_bare, args.connections)
            details("serve", open_serve, args.connections)
            daemon_view(open_serve)
            open_s = figures(open_serve)
        open_errors = open_s.errors if open_s else 0

        left = wait_replies(daemon.port)
        final = scrape(daemon.port)
        sent = sum(r["sent"] for r in [*daemon.runs, *open_serve])
        received = total(final, "natalia_messages_received_total")
        exit_code = stop(daemon)
        stop(bare)

        judged = not args.profile
        print(f"\n=== targets (issue 3){'' if judged else ': not judged under cProfile'} ===")
        verdict(s.rps / b.rps >= TARGET_RATIO, "serve requests/s >= 0.5x the bare handler's", f"{s.rps / b.rps:.3f}x", judged)
        verdict(s.p99 <= TARGET_P99_S, f"serve p99 <= 25 ms, closed loop at {args.connections} connections", fmt_s(s.p99), judged)
        if open_s:
            verdict(open_s.p99 <= TARGET_P99_S, f"serve p99, open loop at {rate:,.0f}/s (<= 25 ms?)", fmt_s(open_s.p99), False)
        verdict(s.p50 <= META_P50_S, "serve p50 <= 250 ms (Meta), closed loop", fmt_s(s.p50), judged)
        verdict(s.errors == 0 and open_errors == 0, "no answer other than 200", str(s.errors + open_errors), True)
        verdict(received == sent, "messages the daemon received == messages sent", f"{received:,.0f}/{sent:,}", True)
        verdict(left == 0, "every accepted message answered before the stop", f"{left:.0f} left", True)
        verdict(exit_code == 0, "SIGTERM: the daemon exits 0", str(exit_code), True)
        print(
            f"\ntotal {fmt_s(time.perf_counter() - started)}; load at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
            f"daemon log {os.path.getsize(log.name) / 1e6:.1f} MB"
        )
        if args.profile:
            print_profile(args.profile)
        ok = s.errors == 0 and open_errors == 0 and received == sent and left == 0 and exit_code == 0
        return 0 if ok else 1
    finally:
        for started_server in (daemon, bare):
            if started_server is not None and started_server.proc.poll() is None:
                stop(started_server)
        log.close()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
