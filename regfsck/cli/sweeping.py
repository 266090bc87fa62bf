"""What the tree-changing commands (gc, rm, undo, purge) share on the command line.

Rendering around the core's mutation session (regfsck.session) and apply flows
(sweep.apply_gc, sweep.apply_rm): the wording of an error that ended a change (for the app's
one handler), recovery messages on stderr, Ctrl-C as a clean stop between batches with a
progress bar, and the reminders printed after a change.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from regfsck.cli.common import CtrlC, human_bytes, note, root_words, show_progress, stderr_console
from regfsck.errors import RegfsckError, disk_full
from regfsck.layout import QUARANTINE_DIR

if TYPE_CHECKING:
    from regfsck.root import RegistryRoot
    from regfsck.sweep import SweepResult

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


def error_text(exc: RegfsckError) -> str:
    """How the app's one handler words an error that ended a tree-changing command (one the
    mutation session marked): an I/O error midway says that the changes made so far are
    kept; a full disk says how to free room."""
    text = str(exc)
    if exc.midway:
        text = f"stopped: {text} (changes made so far are kept and undoable; see `regfsck runs`)"
    if exc.changing is not None and disk_full(exc):
        text += _full_disk_hint(exc.changing)
    return text


def show_recovered(json_output: bool) -> Callable[[list[str]], None]:
    """The `on_recovered` of a mutation session: each recovery message on stderr, at once
    (the JSON documents carry them under "recovered")."""
    def show(messages: list[str]) -> None:
        if not json_output:
            for message in messages:
                note(f"recovered: {message}")
    return show


OnStart = Callable[[int], Callable[[int], None] | None]


@contextmanager
def sweep_controls(json_output: bool) -> Iterator[tuple[threading.Event, OnStart]]:
    """(stop event, `on_start`) for `sweep.apply_removals`: when the sweep starts, Ctrl-C
    becomes a clean stop between batches, and a terminal gets a progress bar for more
    than 200 moves; both end with the block."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    ctrl_c = CtrlC(now=False)
    bars: list[Progress] = []

    def on_start(total: int) -> Callable[[int], None] | None:
        ctrl_c.install()
        if not (show_progress(json_output) and total > 200):
            return None
        progress = Progress(TextColumn("moving to quarantine"), BarColumn(),
                            MofNCompleteColumn(), console=stderr_console(), transient=True)
        task = progress.add_task("move", total=total)
        progress.start()
        bars.append(progress)
        return lambda n: progress.advance(task, n)

    try:
        yield ctrl_c.stop, on_start
    finally:
        for progress in bars:
            progress.stop()
        ctrl_c.restore()


def after_apply_text(registry: RegistryRoot, result: SweepResult, bytes_moved: int | None = None
                     ) -> list[str]:
    """Lines for people after a run: where things went, how to undo, how to free space."""
    if result.run_id is None:
        return ["Nothing was changed."]
    root = root_words(registry)
    held = f" ({human_bytes(bytes_moved)})" if bytes_moved else ""
    lines = [f"Moved {len(result.moved)} paths{held} into {root}/{QUARANTINE_DIR}/"
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
