"""What the tree-changing commands (gc, rm, undo, purge) share on the command line.

Taking the mutation guard and recovering interrupted runs, turning safety and quarantine
errors into one-line refusals (exit 3), Ctrl-C into a clean stop between batches, and
the reminders printed after a change.
"""

from __future__ import annotations

import errno
import signal
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from regfsck import exitcodes
from regfsck.cli.common import fail, human_bytes, note, root_words, show_progress, stderr_console

if TYPE_CHECKING:
    from regfsck.root import RegistryRoot
    from regfsck.sweep import Removal, Revalidate, SweepResult

CACHE_REMINDER = (
    "Restart the registry before it serves this tree again: its blob-descriptor cache "
    "(inmemory or redis) still remembers what was just moved.")


def _full_disk_hint(registry: RegistryRoot) -> str:
    """What frees room for a journal: purging a named, finished run (never all of them)."""
    from regfsck.quarantine import QuarantineError, list_runs

    try:
        runs = [r for r in list_runs(registry) if r.status not in ("running", "undoing")]
    except (QuarantineError, OSError):
        runs = []
    root = root_words(registry)
    if not runs:
        return ("; free some space on the file system holding ROOT (`regfsck runs "
                f"{root}` lists the quarantine)")
    oldest = runs[0]
    return (f"; the quarantine holds {human_bytes(sum(r.bytes for r in runs))} in "
            f"{len(runs)} runs: free the oldest for good with `regfsck purge {root} "
            f"{oldest.run_id} --apply` ({human_bytes(oldest.bytes)}), see `regfsck runs {root}`")


@contextmanager
def guarded(registry: RegistryRoot, json_output: bool) -> Iterator[list[str]]:
    """Hold the root lock (refusing while anything may use ROOT), after crash recovery.

    Yields the recovery messages; every refusal is one line on stderr and exit 3."""
    from regfsck.quarantine import QuarantineError, recover
    from regfsck.safety import SafetyError, mutation_guard
    from regfsck.storage import StorageError, UnsafePathError

    try:
        with mutation_guard(registry):
            messages = recover(registry)
            if messages and not json_output:
                for message in messages:
                    note(f"recovered: {message}")
            yield messages
    except (SafetyError, QuarantineError) as exc:
        fail(str(exc) + (_full_disk_hint(registry) if _no_space(exc) else ""),
             exitcodes.CANNOT_RUN)
    except (StorageError, UnsafePathError) as exc:
        hint = _full_disk_hint(registry) if _no_space(exc) else ""
        fail(f"stopped: {exc} (changes made so far are kept and undoable; see `regfsck runs`)"
             f"{hint}", exitcodes.CANNOT_RUN)


def _no_space(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) is a full disk or quota."""
    while exc is not None:
        if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or \
                "No space left" in str(exc) or "quota exceeded" in str(exc).lower():
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False


def run_sweep(registry: RegistryRoot, command: str, details: dict[str, Any],
              removals: Sequence[Removal], empty_dirs: Sequence[str], *, grace: timedelta,
              revalidate: Revalidate | None, json_output: bool) -> SweepResult:
    """Run `sweep.sweep` with a progress bar on a terminal and Ctrl-C as a clean stop."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from regfsck.sweep import sweep

    stop = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
    progress: Progress | None = None
    try:
        if show_progress(json_output) and len(removals) > 200:
            progress = Progress(TextColumn("moving to quarantine"), BarColumn(),
                                MofNCompleteColumn(), console=stderr_console(), transient=True)
            task = progress.add_task("move", total=len(removals))
            progress.start()
        result = sweep(registry, command, details, removals, empty_dirs, grace=grace,
                       revalidate=revalidate, stop=stop,
                       on_progress=(lambda n: progress.advance(task, n)) if progress else None)
    finally:
        if progress is not None:
            progress.stop()
        signal.signal(signal.SIGINT, previous)
    return result


def after_apply_text(registry: RegistryRoot, result: SweepResult, bytes_moved: int | None = None
                     ) -> list[str]:
    """Lines for people after a run: where things went, how to undo, how to free space."""
    if result.run_id is None:
        return ["Nothing was changed."]
    root = root_words(registry)
    held = f" ({human_bytes(bytes_moved)})" if bytes_moved else ""
    lines = [f"Moved {len(result.moved)} paths{held} into {root}/regfsck-quarantine/"
             f"{result.run_id}/ (nothing is deleted yet)."]
    if result.dirs_removed:
        lines.append(f"Removed {len(result.dirs_removed)} directories left empty.")
    if result.skipped:
        lines.append(f"Left {len(result.skipped)} paths alone after re-checking them "
                     "(see --json for why).")
    if result.interrupted:
        lines.append("Stopped on request: what was moved so far stays moved.")
    lines.append(f"Undo: regfsck undo {root} {result.run_id}")
    lines.append(f"Free the space for good (this run only; cannot be undone): "
                 f"regfsck purge {root} {result.run_id} --apply")
    lines.append(CACHE_REMINDER)
    return lines
