"""`regfsck purge`: delete quarantined runs for good (the only command that frees space)."""

from __future__ import annotations

from pathlib import Path

import typer

from regfsck.cli.app import command
from regfsck.cli.common import (
    APPLY_OPTION,
    BREAK_LOCK_OPTION,
    CONFIG_OPTION,
    JSON_OPTION,
    for_changes,
    human_bytes,
    open_root,
    plural,
    print_json,
    say,
    with_requests,
)
from regfsck.errors import ExitCode

ARGS = typer.Argument(None, metavar="[ROOT] [RUN_ID]...", show_default=False,
                      help="Registry storage root (default /var/lib/registry; omit it with "
                      "--config), then the runs to delete (default: every finished run; see "
                      "`regfsck runs`).")


@command()
def purge(
    args: list[str] | None = ARGS,
    config: Path | None = CONFIG_OPTION,
    older_than: str = typer.Option("0", "--older-than", metavar="DUR", help="Only runs that "
                                   "ended at least this long ago (90s, 30m, 1h, 7d; default 0 = all).",
                                   show_default=False),
    apply: bool = APPLY_OPTION,
    force: bool = typer.Option(False, "--force", help="Also delete runs whose content another "
                               "run's undo still needs (that undo will then refuse, or restore "
                               "tags that cannot be pulled)."),
    json_output: bool = JSON_OPTION,
    break_lock: bool = BREAK_LOCK_OPTION,
) -> None:
    """Delete quarantined runs for good and report the bytes freed (they can no longer be undone)."""
    from regfsck.durations import parse_duration
    from regfsck.quarantine import check_run_id
    from regfsck.quarantine import purge as purge_runs
    from regfsck.session import mutation_session

    values = list(args or [])
    root = None if config is not None or not values else Path(values.pop(0))
    registry = for_changes(open_root(root, config, object_storage=True), break_lock=break_lock)
    age = parse_duration(older_than, "--older-than")
    run_ids = [check_run_id(v, ExitCode.USAGE) for v in values] or None
    # A quarantine session, only the lock: the registry never reads the quarantine, so it
    # may keep running.
    with mutation_session(registry, command="purge", tree=False) as session:
        result = purge_runs(session, age, dry_run=not apply, force=force, run_ids=run_ids)
    if json_output:
        print_json(with_requests(registry, result.to_json()))
        raise typer.Exit(ExitCode.OK)
    verb = "Deleted" if apply else "Would delete"
    say(f"{verb} {plural(len(result.runs), 'run')}: {human_bytes(result.bytes_freed)} "
        f"{'freed' if apply else 'to free'}.")
    for run_id in result.runs:
        say(f"  {run_id}")
    for run_id, users in result.needed.items():
        say(f"Kept {run_id}: the undo of run {', '.join(users)} needs what it holds "
            "(undo or purge those first, or use --force).")
    others = len(result.kept) - len(result.needed)
    if others:
        say(f"Kept {plural(others, 'run')} (younger than --older-than, or interrupted: "
            "the next gc/undo recovers those).")
    if not apply and result.runs:
        say("Nothing was deleted: run again with --apply (this cannot be undone).")
    raise typer.Exit(ExitCode.OK)
