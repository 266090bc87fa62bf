"""`regfsck undo`: put a gc, rm, import or repair run back exactly."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from regfsck.cli.app import command
from regfsck.cli.common import (
    BREAK_LOCK_OPTION,
    CONFIG_OPTION,
    JSON_OPTION,
    NO_REGISTRY_CHECK_OPTION,
    REGISTRY_URL_OPTION,
    fail,
    for_changes,
    note,
    open_root,
    print_json,
    say,
    warn,
    with_requests,
)
from regfsck.errors import ExitCode

if TYPE_CHECKING:
    from regfsck.quarantine import UndoPlan
    from regfsck.root import RegistryRoot

ARGS = typer.Argument(None, metavar="[ROOT] [RUN_ID]", show_default=False,
                      help="Registry storage root (default /var/lib/registry; omit it with --config), "
                      "then the run to undo (default: the newest run not yet reverted; see "
                      "`regfsck runs`).")


def split_root_and_run(args: list[str] | None, config: Path | None) -> tuple[Path | None, str | None]:
    """`[ROOT] [RUN_ID]`: with --config every argument is a run id."""
    values = list(args or [])
    root = None if config is not None or not values else Path(values.pop(0))
    if len(values) > 1:
        fail("give at most one RUN_ID", ExitCode.USAGE)
    return root, values[0] if values else None


DRY_RUN_OPTION = typer.Option(False, "--dry-run", help="Show the plan the undo would carry out "
                              "now (what moves back, what is kept and why, or why it is refused) "
                              "and change nothing.")


def _show_plan(registry: RegistryRoot, plan: UndoPlan, json_output: bool) -> None:
    if json_output:
        print_json(with_requests(registry, {**plan.to_json(), "applied": False}))
        raise typer.Exit(ExitCode.CANNOT_RUN if plan.problems else ExitCode.OK)
    counts = {a: plan.count(a) for a in ("move_back", "unmake", "rmdir", "remake_dir", "keep",
                                         "already_there")}
    say(f"Undo of run {plan.run_id} would: move {counts['move_back']} paths back, move "
        f"{counts['unmake']} created files into the run's quarantine, remove "
        f"{counts['rmdir']} and recreate {counts['remake_dir']} directories, keep "
        f"{counts['keep'] + counts['already_there']} paths in place.")
    for step in plan.steps:
        if step.action in ("keep", "already_there"):
            say(f"  keep {step.rel}: {step.why}")
    for warning in plan.warnings:
        say(f"  warning: {warning}")
    if plan.then_finishes and not plan.problems:
        say(f"Then the undos of runs {', '.join(plan.then_finishes)} (which kept what later "
            "runs needed) are judged again: what they kept only for this run's files goes too.")
    if plan.problems:
        say(f"Refused: {plan.refusal()}")
        raise typer.Exit(ExitCode.CANNOT_RUN)
    say("Nothing was changed (--dry-run).")
    raise typer.Exit(ExitCode.OK)


@command()
def undo(args: list[str] | None = ARGS, config: Path | None = CONFIG_OPTION,
         dry_run: bool = DRY_RUN_OPTION, json_output: bool = JSON_OPTION,
         registry_url: list[str] | None = REGISTRY_URL_OPTION,
         no_registry_check: bool = NO_REGISTRY_CHECK_OPTION,
         break_lock: bool = BREAK_LOCK_OPTION) -> None:
    """Revert a run: what it moved comes back, what it created goes to its quarantine.

    Planned against the tree as it is now before anything moves: creations that something
    written since uses (or that were rewritten since) stay in place; an undo that cannot
    be done whole, or would bring back a tag that cannot be pulled, is refused (exit 3)
    naming the newer run to undo first. Nothing is deleted: reverted creations wait in
    the run's quarantine for `purge`."""
    from regfsck.cli.sweeping import CACHE_REMINDER, show_recovered
    from regfsck.quarantine import plan_undo, reverted_by_recovery, undo_target
    from regfsck.quarantine import undo as undo_run
    from regfsck.session import mutation_session

    root, run_id = split_root_and_run(args, config)
    registry = for_changes(open_root(root, config, object_storage=True), registry_url,
                           no_registry_check, break_lock)
    if dry_run:
        _show_plan(registry, plan_undo(registry, undo_target(registry, run_id)), json_output)
    with mutation_session(registry, command="undo",
                          on_recovered=show_recovered(json_output)) as session:
        recovered = session.recovered
        done = reverted_by_recovery(session, run_id)
        if done is not None:  # the interrupted run was the one to undo
            if json_output:
                print_json(with_requests(registry, {"run_id": done, "reverted_by_recovery": True,
                                                    "recovered": recovered}))
            else:
                say(f"Run {done} had been interrupted; recovery reverted it.")
            raise typer.Exit(ExitCode.OK)
        result = undo_run(session, run_id)
    if json_output:
        print_json(with_requests(registry, {**result.to_json(), "reverted_by_recovery": False,
                                            "recovered": recovered}))
    else:
        say(f"Reverted run {result.run_id} ({result.command}): {result.moved_back} paths "
            f"moved back, {result.files_removed} created files moved into its quarantine, "
            f"{result.dirs_removed} created directories removed, {result.dirs_recreated} "
            "directories recreated.")
        files_kept = [k for k in result.kept if "/data:" in k or "/link:" in k]
        if files_kept:
            say(f"Kept in place {len(files_kept)} files the run had created that are used "
                "or rewritten since:")
            for line in files_kept[:20]:
                say(f"  {line}")
        for finished in result.finished:
            say(f"Finished the undo of run {finished['run_id']} ({finished['command']}), "
                f"which had left in place what this run wrote: {finished['moved_back']} paths "
                f"moved back, {finished['files_removed']} created files moved into its "
                f"quarantine, {finished['dirs_removed']} directories removed, "
                f"{finished['dirs_recreated']} recreated.")
        for warning in result.warnings:
            warn(f"warning: {warning}")
        note(CACHE_REMINDER)
    raise typer.Exit(ExitCode.OK)
