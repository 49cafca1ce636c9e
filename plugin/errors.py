"""Errors that reach the user as one line and an exit code, never a traceback."""
from __future__ import annotations

import sys
from typing import Callable


class CompressError(Exception):
    """Base class: a failure the CLI reports as one line."""

    exit_code = 1


class UserError(CompressError):
    """Bad input (recipe, arguments, files). The message says what is wrong and what to do."""

    exit_code = 2


class StageFailed(CompressError):
    """A stage could not finish its work on valid input."""

    exit_code = 1


class NotAvailable(CompressError):
    """No installed plugin implements a stage or capability that was asked for."""

    exit_code = 2


def run_as_script(label: str, work: Callable[[], object]) -> None:
    """For a module a setup script runs: print what ``work`` returns, or its error as one line and exit 1."""
    try:
        print(work())
    except CompressError as exc:
        print(f"{label}: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
