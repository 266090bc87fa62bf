"""Exit codes scripts act on (documented in the README), and the errors that carry them.

Every error an operator can meet derives from `RegfsckError` and knows its exit code, so
the CLI has one handler (`cli.app.Command.invoke`) that prints it as one line (or the
`{"error", "exit_code"}` JSON document under --json) and exits with `exit_code`; the
command modules do not catch and map. An error raised where its default code is wrong
for the situation is raised with `exit_code=` by the code that knows the situation.

An error that ends a tree-changing command also carries what the message needs: the mutation
session (regfsck.session) it ended sets `changing` (the root, so a full disk can be met with
how to free room in its quarantine) and `midway` (an I/O error once changing began: what
was changed so far stays, journaled and undoable); the handler renders both.

Cheap to import (the CLI loads it at start-up): nothing but `enum` and `errno`.
"""

from __future__ import annotations

import enum
import errno
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from regfsck.root import RegistryRoot


class ExitCode(enum.IntEnum):
    OK = 0  # nothing wrong (warnings and orphans allowed)
    FINDINGS = 1  # error findings / something to act on / damaged input
    USAGE = 2  # bad command line
    CANNOT_RUN = 3  # not a registry root, registry running, lock held, damage blocks gc, I/O
    INTERRUPTED = 130  # Ctrl-C: stopped at a safe point


class RegfsckError(Exception):
    """An error shown to the operator as one line; the process exits with `exit_code`."""

    exit_code: ExitCode = ExitCode.CANNOT_RUN
    changing: RegistryRoot | None = None  # the root whose change this error ended
    midway: bool = False  # an I/O error inside that change: what was done so far is kept

    def __init__(self, message: str = "", *, exit_code: ExitCode | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(RegfsckError):
    """What was typed cannot be acted on (a bad reference, duration, digest, option)."""

    exit_code = ExitCode.USAGE


class Interrupted(RegfsckError):
    """Ctrl-C (or a stop request) ended the work at a safe point; the message says what
    became of it. The one cancellation exception: readers, hashers, the deep pass, export,
    import and repair all stop with it."""

    exit_code = ExitCode.INTERRUPTED

    def __init__(self, message: str = "interrupted", *, exit_code: ExitCode | None = None) -> None:
        super().__init__(message, exit_code=exit_code)


def disk_full(exc: BaseException | None) -> bool:
    """Whether `exc`, or what caused it, is a full disk or an exceeded quota."""
    while exc is not None:
        if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or \
                "No space left" in str(exc) or "quota exceeded" in str(exc).lower():
            return True
        exc = exc.__cause__ or exc.__context__
    return False


# Errors that classify themselves by what went wrong (import, export): the exit code of each.
REASON_EXIT = {"usage": ExitCode.USAGE, "damage": ExitCode.FINDINGS, "io": ExitCode.CANNOT_RUN}
