"""What the tree-changing commands (gc, rm, undo, purge) share on the command line.

Taking the mutation guard and recovering interrupted runs, turning safety and quarantine
errors into one-line refusals (exit 3), Ctrl-C into a clean stop between batches, and
the reminders printed after a change.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from regfsck import exitcodes
from regfsck.cli.common import fail, show_progress, stderr_console
from regfsck.quarantine import QuarantineError, recover
from regfsck.root import RegistryRoot
from regfsck.safety import SafetyError, mutation_guard
from regfsck.storage import StorageError, UnsafePathError
from regfsck.sweep import Removal, Revalidate, SweepResult, sweep

CACHE_REMINDER = (
    "Restart the registry before it serves this tree again: its blob-descriptor cache "
    "(inmemory or redis) still remembers what was just moved.")


@contextmanager
def guarded(registry: RegistryRoot, json_output: bool) -> Iterator[list[str]]:
    """Hold the root lock (refusing while anything may use ROOT), after crash recovery.

    Yields the recovery messages; every refusal is one line on stderr and exit 3."""
    try:
        with mutation_guard(registry):
            messages = recover(registry)
            if messages and not json_output:
                for message in messages:
                    stderr_console().print(f"recovered: {message}", highlight=False)
            yield messages
    except (SafetyError, QuarantineError) as exc:
        fail(str(exc), exitcodes.CANNOT_RUN)
    except (StorageError, UnsafePathError) as exc:
        fail(f"stopped: {exc} (changes made so far are kept and undoable; see `regfsck runs`)",
             exitcodes.CANNOT_RUN)


def run_sweep(registry: RegistryRoot, command: str, details: dict[str, Any],
              removals: Sequence[Removal], empty_dirs: Sequence[str], *, grace: timedelta,
              revalidate: Revalidate | None, json_output: bool) -> SweepResult:
    """Run `sweep.sweep` with a progress bar on a terminal and Ctrl-C as a clean stop."""
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


def after_apply_text(registry: RegistryRoot, result: SweepResult) -> list[str]:
    """Lines for people after a run: where things went, how to undo, how to free space."""
    if result.run_id is None:
        return ["Nothing was changed."]
    lines = [f"Moved {len(result.moved)} paths into {registry.root}/regfsck-quarantine/"
             f"{result.run_id}/ (nothing is deleted yet)."]
    if result.dirs_removed:
        lines.append(f"Removed {len(result.dirs_removed)} directories left empty.")
    if result.skipped:
        lines.append(f"Left {len(result.skipped)} paths alone after re-checking them "
                     "(see --json for why).")
    if result.interrupted:
        lines.append("Stopped on request: what was moved so far stays moved.")
    lines.append(f"Undo: regfsck undo {registry.root} {result.run_id}")
    lines.append(f"Free the space for good: regfsck purge {registry.root} --older-than 0 --apply")
    lines.append(CACHE_REMINDER)
    return lines
