"""One error tree for the whole program.

Every error an operator can meet is a `NataliaError` subclass carrying a one-line message and the exit code the
command line returns for it (borg's pattern). Codes are a contract documented in README.md; never renumber one.
"""

from __future__ import annotations


class NataliaError(Exception):
    """Base of every expected failure; `str(err)` is the one line shown to the operator."""

    exit_code = 1


class UsageError(NataliaError):
    """The command line or configuration asks for something impossible."""

    exit_code = 2


class ConfigError(NataliaError):
    """The environment is unsafe or incomplete: state directory permissions, missing paths."""

    exit_code = 3


class KeyMaterialError(NataliaError):
    """The master key or a data key is missing, unreadable, malformed or wrong."""

    exit_code = 4


class IntegrityError(NataliaError):
    """A sealed file failed authentication or is malformed: it is never loaded, changed or deleted."""

    exit_code = 5


class LockHeldError(NataliaError):
    """Another writer (the daemon or an admin command) holds the store lock."""

    exit_code = 6


class StoreUnavailable(NataliaError):
    """The store cannot make a change durable (disk full, I/O error, degraded); nothing was acknowledged."""

    exit_code = 7


class NotFoundError(NataliaError):
    """The named session, file or key does not exist."""

    exit_code = 8


class InputError(NataliaError):
    """An input file (e.g. a legacy sessions.json) is malformed; nothing was imported."""

    exit_code = 9


class EnvelopeError(IntegrityError):
    """The one exception for every failure to open a sealed envelope or journal record."""


class PayloadError(InputError):
    """A webhook body of the right kind with the wrong shape: answered 400, nothing recorded."""


class SendError(NataliaError):
    """WhatsApp did not take a message (graph.py). `kind` says what to do: window_closed, undeliverable and
    rejected will never succeed (the reply is dropped); token, rate, server and transport may later (it is kept)."""

    exit_code = 7

    def __init__(self, message: str, *, code: int | None = None, status: int | None = None, kind: str = "rejected") -> None:
        super().__init__(message)
        self.code = code
        self.status = status
        self.kind = kind
