"""The reliability suite (issue 7) in one command: crash trials, faults, tamper, fuzz, load with chaos and the log
privacy scan, then the table of figures (tests/figures.py), each row with the command that reproduces it.

    .venv/bin/python bench/reliability.py                  # the sizes CI runs (minutes)
    .venv/bin/python bench/reliability.py --long           # the big numbers (10,000 crash trials, 100,000 fuzz cases: hours)
    .venv/bin/python bench/reliability.py --out FILE.md    # also keep the table (README's "Reliability" section)

It is `python -m pytest -m reliability [--long] --figures FILE` from the repository's root; the exit status is
pytest's (0: every test passed, so every figure met its target).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--long", action="store_true", help="the big numbers")
    parser.add_argument("--out", metavar="FILE", help="write the figures table (Markdown) to FILE")
    parser.add_argument("pytest_args", nargs="*", help="more pytest arguments (e.g. -x, -k crash)")
    args = parser.parse_args()
    out = args.out or os.path.join(tempfile.mkdtemp(prefix="natalia-reliability-"), "figures.md")
    command = [sys.executable, "-m", "pytest", "-m", "reliability", "-p", "no:cacheprovider", "--figures", out]
    command += ["--long"] * args.long + args.pytest_args
    print("running:", " ".join(command), flush=True)
    code = subprocess.run(command, cwd=ROOT, check=False).returncode
    if os.path.exists(out):
        print()
        with open(out) as f:
            print(f.read(), end="")
        print(f"\n(figures in {out})")
    return code


if __name__ == "__main__":
    sys.exit(main())
