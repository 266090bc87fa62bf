"""`regfsck runs`: the quarantine's runs, what each did and what purging it would free."""

from __future__ import annotations

from pathlib import Path

import typer

from regfsck.cli.app import command
from regfsck.cli.common import (
    CONFIG_OPTION,
    JSON_OPTION,
    ROOT_ARGUMENT,
    human_bytes,
    open_root,
    print_json,
    root_words,
    say,
    with_requests,
)
from regfsck.errors import ExitCode
from regfsck.layout import QUARANTINE_DIR


@command()
def runs(root: Path | None = ROOT_ARGUMENT, config: Path | None = CONFIG_OPTION,
         json_output: bool = JSON_OPTION) -> None:
    """List the runs kept in ROOT/regfsck-quarantine (oldest first)."""
    registry = open_root(root, config, object_storage=True)
    from regfsck.quarantine import list_runs

    found = list_runs(registry)
    if json_output:
        print_json(with_requests(registry, {"runs": [r.to_json() for r in found],
                                            "bytes": sum(r.bytes for r in found)}))
        raise typer.Exit(ExitCode.OK)
    if not found:
        say("No runs in the quarantine.")
        raise typer.Exit(ExitCode.OK)
    words = root_words(registry)
    say(f"Runs in {registry.display}/{QUARANTINE_DIR} (ids start with the UTC time):")
    for run in found:
        note = f"  ({run.note})" if run.note else ""
        if run.undo_kept:
            note += (f"  (its undo left {len(run.undo_kept)} paths in place: used, rewritten "
                     "or written again since)")
        changes = f"{run.changes:>7} {'change ' if run.changes == 1 else 'changes'}"
        say(f"{run.run_id}  {run.command:<7} {run.status:<11} {changes} "
            f"{human_bytes(run.bytes):>10}{note}")
    say(f"{human_bytes(sum(r.bytes for r in found))} held in total; "
        f"`regfsck undo {words} RUN_ID` reverts a run, `regfsck purge {words} RUN_ID --apply` "
        "frees it for good.")
    raise typer.Exit(ExitCode.OK)
