"""The package stays typed (mypy --strict) and linted (ruff): checked by the suite so CI enforces it."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mypy_strict_passes_on_the_package() -> None:
    """mypy --strict (configured in pyproject.toml) finds no error in natalia_secure/."""
    result = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_passes_on_package_tests_and_bench() -> None:
    """ruff (rules in pyproject.toml) finds nothing in the package, the tests or the benchmarks."""
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "natalia_secure", "tests", "bench"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
