"""Reliability figures (issue 7): what the crash, fault, tamper, fuzz and chaos tests survived, as numbers.

A test that measures something records it through the `figures` fixture (tests/conftest.py):

    figures.record("Crash", "SIGKILLs of the daemon under signed webhook load", "500 trials: 0 lost", "0 lost", ok)

The session prints every recorded figure as one table at the end, and `--figures FILE` writes it as Markdown with
the date, the machine and, for each row, the command that reproduces it (README's "Reliability" table is such a
file). `bench/reliability.py` runs the suite (`-m reliability`, `--long` for the big numbers) and prints the table.
"""

from __future__ import annotations

import datetime
import os
import platform
from dataclasses import dataclass, field

AREAS = ("Crash", "Faults", "Tamper", "Fuzz", "Load with chaos", "Log privacy")


@dataclass(frozen=True)
class Figure:
    area: str  # one of AREAS
    what: str  # what was done, e.g. "SIGKILL of the daemon at random instants under signed webhook load"
    result: str  # what came out, with the counts, e.g. "500 trials: 0 acknowledged messages lost"
    target: str  # what the issue asks, e.g. "0 lost"
    ok: bool
    nodeid: str  # the test that measured it
    long: bool  # measured with --long


@dataclass
class Figures:
    rows: list[Figure] = field(default_factory=list)

    def command(self, figure: Figure) -> str:
        return f".venv/bin/python -m pytest '{figure.nodeid}'" + (" --long" if figure.long else "")

    def table(self) -> list[str]:
        order = {a: i for i, a in enumerate(AREAS)}
        lines = ["| area | what | result | target | | command |", "|---|---|---|---|---|---|"]
        for f in sorted(self.rows, key=lambda f: (order.get(f.area, len(AREAS)), f.nodeid)):
            mark = "PASS" if f.ok else "FAIL"
            lines.append(f"| {f.area} | {f.what} | {f.result} | {f.target} | {mark} | `{self.command(f)}` |")
        return lines

    def markdown(self) -> str:
        with open("/proc/cpuinfo") as cpu:
            model = next((line.split(":", 1)[1].strip() for line in cpu if line.startswith("model name")), "?")
        when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
        head = [
            f"Measured {when} on {os.cpu_count()} CPUs ({model}), Linux {platform.release()}, Python "
            f"{platform.python_version()}.",
            "",
        ]
        return "\n".join(head + self.table()) + "\n"


class Recorder:
    """What a test gets: `record(...)` adds one row, stamped with the test's id and whether --long ran it."""

    def __init__(self, figures: Figures, nodeid: str, long: bool) -> None:
        self._figures, self._nodeid, self._long = figures, nodeid, long

    def record(self, area: str, what: str, result: str, target: str, ok: bool) -> None:
        if area not in AREAS:
            raise ValueError(f"unknown area {area!r}; one of {AREAS}")
        self._figures.rows.append(Figure(area, what, result, target, ok, self._nodeid, self._long))
