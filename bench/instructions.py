"""Instructions per webhook: the daemon's CPU cost counted by valgrind, immune to the shared VM's noise.

bench/webhook.py measures time, and on this 2-CPU VM shared with other machines the same code measures 140-280 us per
request from one hour to the next: a 5% change cannot be seen. This counts instructions instead (valgrind's
cachegrind, no cache simulation; ~30x slower, repeatable to ~1-2%): the daemon (`python -m natalia_secure serve`
from the current directory's package, as bench/webhook.py starts it) gets WARM signed webhooks, then N1 more; a second
daemon WARM, then N2; (instructions of the second - the first) / (N2 - N1) is the cost of one webhook, its reply and
its share of the group commits, without start-up and warm-up. `--bare` counts the bare Tornado handler of
bench/webhook.py the same way.

    .venv/bin/python bench/instructions.py                 # ~1 min; needs valgrind (apt-get install valgrind)
    .venv/bin/python bench/instructions.py --bare
    cd /tmp/variant && /work/main/.venv/bin/python /work/main/bench/instructions.py   # a copy of natalia_secure/

Read it with its limits: valgrind counts each byte of a `rep stosb` memset as an instruction (a 64 KiB zeroed
buffer shows as 65,536), system calls count only their user-space side, and cache misses are not counted at all.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

import webhook as W


def count(n: int, warm: int, bare: bool) -> tuple[int, float]:
    """Instructions of a whole daemon (or bare server) life that served `warm` then `n` webhooks; replies written."""
    base = tempfile.mkdtemp(dir="/var/tmp", prefix="natalia-bench-instructions-")
    try:
        report = os.path.join(base, "valgrind.txt")
        valgrind = ["valgrind", "--tool=cachegrind", "--cache-sim=no", f"--cachegrind-out-file={base}/out"]
        valgrind.append(f"--log-file={report}")
        if bare:
            proc = subprocess.Popen([*valgrind, sys.executable, W.__file__, "--bare-child"], stdout=subprocess.PIPE, text=True)
            assert proc.stdout is not None
            port = int(proc.stdout.readline())
        else:
            port = W.free_port()
            env = W.daemon_env(base, port)
            with open(os.path.join(base, "daemon.log"), "w") as log:
                command = [*valgrind, sys.executable, "-m", "natalia_secure", "serve"]
                proc = subprocess.Popen(command, env=env, stdout=log, stderr=log)
            deadline = time.monotonic() + 300
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5).read()
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit(f"the daemon did not start under valgrind (see {base})") from None
                    time.sleep(0.5)
        replies = 0.0
        try:
            for tag, size in (("w", warm), ("t", n)):
                asyncio.run(W.drive(port, W.build_requests(port, tag, size, 1000, W.SEED), 64, 0.0))
                if not bare:
                    W.wait_replies(port, timeout=900)
            if not bare:
                replies = sum(v for k, v in W.scrape(port).items() if k.startswith("natalia_replies_total"))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=600)
        with open(report) as f:
            found = re.search(r"I\s+refs:\s+([\d,]+)", f.read())
        if found is None:
            raise SystemExit(f"valgrind reported no instruction count (see {report})")
        return int(found[1].replace(",", "")), replies
    finally:
        shutil.rmtree(base, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--warm", type=int, default=4000, help="webhooks before the counted ones (default 4,000)")
    p.add_argument("--n1", type=int, default=200)
    p.add_argument("--n2", type=int, default=2200)
    p.add_argument("--bare", action="store_true", help="the bare Tornado handler instead of the daemon")
    args = p.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (apt-get install valgrind)")
    a, ra = count(args.n1, args.warm, args.bare)
    b, rb = count(args.n2, args.warm, args.bare)
    per = (b - a) / (args.n2 - args.n1)
    what = "bare Tornado 200" if args.bare else f"serve from {os.getcwd()}/natalia_secure"
    extra = "" if args.bare else f"; {rb - ra:,.0f} replies written for those {args.n2 - args.n1:,} webhooks"
    print(f"{what}: {per:,.0f} instructions per webhook (after {args.warm:,} warm-up; {args.n1:,} vs {args.n2:,}{extra})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
