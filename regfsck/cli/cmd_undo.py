"""`regfsck undo`: put a gc, rm, import or repair run back exactly."""

from __future__ import annotations

from pathlib import Path

import typer

from regfsck import exitcodes
from regfsck.cli.app import app
from regfsck.cli.common import CONFIG_OPTION, JSON_OPTION, fail, open_root, print_json, stdout_console
from regfsck.cli.sweeping import CACHE_REMINDER, guarded
from regfsck.quarantine import QuarantineError, list_runs
from regfsck.quarantine import undo as undo_run

ARGS = typer.Argument(None, metavar="[ROOT] [RUN_ID]", show_default=False,
                      help="Registry storage root (default /var/lib/registry; omit it with --config), "
                      "then the run to undo (default: the newest run not yet reverted; see "
                      "`regfsck runs`).")


def split_root_and_run(args: list[str] | None, config: Path | None) -> tuple[Path | None, str | None]:
    """`[ROOT] [RUN_ID]`: with --config every argument is a run id."""
    values = list(args or [])
    root = None if config is not None or not values else Path(values.pop(0))
    if len(values) > 1:
        fail("give at most one RUN_ID", exitcodes.USAGE)
    return root, values[0] if values else None


@app.command()
def undo(args: list[str] | None = ARGS, config: Path | None = CONFIG_OPTION,
         json_output: bool = JSON_OPTION) -> None:
    """Revert a run exactly: same paths, same bytes, directory mtimes restored."""
    root, run_id = split_root_and_run(args, config)
    registry = open_root(root, config)
    try:
        open_runs = {r.run_id for r in list_runs(registry) if r.status in ("running", "undoing")}
    except QuarantineError as exc:
        fail(str(exc))
    with guarded(registry, json_output) as recovered:
        reverted_by_recovery = [r.run_id for r in list_runs(registry)
                                if r.run_id in open_runs and r.status == "reverted"]
        if reverted_by_recovery and (run_id is None or run_id in reverted_by_recovery):
            # The interrupted run was the one to undo, and recovery just reverted it.
            if json_output:
                print_json({"run_id": reverted_by_recovery[-1], "reverted_by_recovery": True,
                            "recovered": recovered})
            else:
                stdout_console().print(f"Run {reverted_by_recovery[-1]} had been interrupted; "
                                       "recovery reverted it.")
            raise typer.Exit(exitcodes.OK)
        try:
            result = undo_run(registry, run_id)
        except QuarantineError as exc:
            fail(str(exc), exitcodes.CANNOT_RUN)
    if json_output:
        print_json({**result.to_json(), "reverted_by_recovery": False, "recovered": recovered})
    else:
        console = stdout_console()
        console.print(f"Reverted run {result.run_id} ({result.command}): {result.moved_back} paths "
                      f"moved back, {result.files_removed} created files and {result.dirs_removed} "
                      f"created directories removed, {result.dirs_recreated} directories recreated.")
        console.print(CACHE_REMINDER)
    raise typer.Exit(exitcodes.OK)
