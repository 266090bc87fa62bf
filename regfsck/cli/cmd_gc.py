"""`regfsck gc`: the collector operators can trust; a plan by default, undoable with --apply."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import typer
from rich.table import Table

from regfsck import exitcodes
from regfsck.cli.app import app
from regfsck.cli.common import (
    APPLY_OPTION,
    CONFIG_OPTION,
    JSON_OPTION,
    ROOT_ARGUMENT,
    fail,
    human_bytes,
    open_root,
    print_json,
    shown,
    stderr_console,
    stdout_console,
    with_requests,
)
from regfsck.cli.sweeping import after_apply_text, guarded, run_sweep
from regfsck.durations import DurationError, format_duration, parse_duration
from regfsck.gc import GcOptions, GcPlan, plan_gc, revalidator
from regfsck.quarantine import QuarantineError, list_runs
from regfsck.root import RegistryRoot
from regfsck.safety import registry_users
from regfsck.storage import StorageError

MAX_ROWS = 200


def _duration(value: str, option: str) -> timedelta:
    try:
        return parse_duration(value)
    except DurationError as exc:
        fail(f"{option}: {exc}", exitcodes.USAGE)


@app.command()
def gc(
    root: Path | None = ROOT_ARGUMENT,
    config: Path | None = CONFIG_OPTION,
    delete_untagged: bool = typer.Option(
        False, "--delete-untagged", help="Mark only from tags (their current links): untagged "
        "manifests go too. Children of kept indexes and referrers of kept manifests stay."),
    uploads_older_than: str = typer.Option(
        "168h", "--uploads-older-than", metavar="DUR", help="Remove uploads started longer ago "
        "than this (uploads without startedat always go). 90s, 30m, 1h, 7d; 0 = all."),
    grace: str = typer.Option(
        "1h", "--grace", metavar="DUR", help="Never remove anything modified more recently than "
        "this (it may belong to a push in flight). 0 = no grace."),
    force: bool = typer.Option(
        False, "--force", help="Collect even when damage makes marking unreliable. LOSSY: blobs "
        "only a damaged manifest needs are removed too."),
    apply: bool = APPLY_OPTION,
    json_output: bool = JSON_OPTION,
) -> None:
    """Remove what no image needs: unreferenced blobs, dead links, stale uploads (undoable)."""
    registry = open_root(root, config, object_storage=True)
    if apply and registry.is_object_storage:
        fail(f"gc --apply is not available on object storage yet: nothing was changed in "
             f"{registry.display} (run without --apply for the plan)")
    options = GcOptions(delete_untagged=delete_untagged,
                        uploads_older_than=_duration(uploads_older_than, "--uploads-older-than"),
                        grace=_duration(grace, "--grace"), force=force)
    if not apply and registry.is_object_storage:
        try:
            plan = plan_gc(registry, options)
        except StorageError as exc:
            fail(str(exc))
        _output(plan, json_output, [], registry)
        raise typer.Exit(exitcodes.CANNOT_RUN if plan.is_blocked else exitcodes.OK)
    if not apply:
        users = registry_users(registry)
        if users and not json_output:
            stderr_console().print(f"note: {len(users)} process(es) may be using this tree "
                                   f"({users[0]}); the plan may already be stale.")
        try:
            pending = [r.run_id for r in list_runs(registry) if r.status in ("running", "undoing")]
        except QuarantineError as exc:
            pending = []
            if not json_output:
                stderr_console().print(f"note: {exc}; --apply will refuse until it is fixed")
        if pending and not json_output:
            stderr_console().print(f"note: run {pending[0]} was interrupted; the next --apply "
                                   "recovers it first.")
        plan = plan_gc(registry, options)
        _output(plan, json_output, [])
        raise typer.Exit(exitcodes.CANNOT_RUN if plan.is_blocked else exitcodes.OK)
    with guarded(registry, json_output) as recovered:
        plan = plan_gc(registry, options)
        if plan.is_blocked:
            _output(plan, json_output, recovered)
            raise typer.Exit(exitcodes.CANNOT_RUN)
        result = run_sweep(registry, "gc", {"options": options.to_json()}, plan.removal_list,
                           plan.empty_dirs, grace=options.grace,
                           revalidate=revalidator(registry, plan), json_output=json_output)
    plan.applied = result.run_id is not None
    plan.run_id = result.run_id
    plan.apply_result = result.to_json()
    _output(plan, json_output, recovered)
    if not json_output:
        for line in after_apply_text(registry, result):
            stderr_console().print(line, highlight=False)
    raise typer.Exit(exitcodes.INTERRUPTED if result.interrupted else exitcodes.OK)


def _output(plan: GcPlan, json_output: bool, recovered: list[str],
            registry: RegistryRoot | None = None) -> None:
    if json_output:
        doc = {**plan.to_json(), "recovered": recovered}
        print_json(with_requests(registry, doc) if registry is not None else doc)
    else:
        render_plan(plan)


def render_plan(plan: GcPlan) -> None:
    console = stdout_console()
    mode = ("--delete-untagged: marking from tags only" if plan.options.delete_untagged
            else "marking from every manifest revision")
    console.print(f"gc plan ({mode}; grace {format_duration(plan.options.grace)}, uploads older "
                  f"than {format_duration(plan.options.uploads_older_than)})")
    if plan.blocked:
        table = Table(title="Damage that makes marking unreliable"
                      + (" (--force given: collecting anyway, LOSSY)" if plan.options.force else ""))
        for column in ("kind", "where", "message"):
            table.add_column(column, overflow="fold")
        for finding in plan.blocked[:MAX_ROWS]:
            table.add_row(finding.kind, shown(finding.path), shown(finding.message))
        console.print(table)
        if not plan.options.force:
            console.print("[bold red]gc refuses to collect this tree.[/] Fix the damage first "
                          "(`regfsck verify`, then repair or restore), or pass --force to collect "
                          "anyway and accept losing blobs only damaged manifests need.")
    if plan.per_repository:
        table = Table(title="What would go, per repository" if not plan.applied else "What went")
        for column in ("repository", "manifests", "layer links", "uploads", "tag dirs", "bytes"):
            table.add_column(column, justify="left" if column == "repository" else "right")
        for name, usage in sorted(plan.per_repository.items()):
            table.add_row(shown(name), str(usage.manifests), str(usage.layer_links),
                          str(usage.uploads), str(usage.tag_dirs), human_bytes(usage.reclaimable_bytes))
        console.print(table)
    rows: list[tuple[str, str, str, str]] = []
    rows += [("blob", b.digest, b.reason, human_bytes(b.size)) for b in plan.blobs]
    rows += [("manifest", f"{m.repo}@{m.digest}", m.reason, "") for m in plan.manifests]
    rows += [("layer link", f"{link.repo} -> {link.target}", link.reason, "") for link in plan.layer_links]
    rows += [("upload", f"{u.repo} {u.id}", u.reason, human_bytes(u.size)) for u in plan.uploads]
    rows += [("tag dir", f"{r}:{t}", "left empty", "") for r, t in plan.tag_dirs]
    rows += [("repository", r, "left empty", "") for r in plan.repositories]
    if rows:
        table = Table(title="Details")
        for column in ("what", "name", "why", "size"):
            table.add_column(column, overflow="fold")
        for what, name, why, size in rows[:MAX_ROWS]:
            table.add_row(what, shown(name), why, size)
        console.print(table)
        if len(rows) > MAX_ROWS:
            console.print(f"... and {len(rows) - MAX_ROWS} more (--json lists everything)")
    for orphan in plan.orphan_referrers:
        fate = "kept" if orphan.kept else "removed with the untagged manifests"
        console.print(f"referrer {shown(orphan.repo)}@{orphan.digest}: its subject "
                      f"{orphan.subject} is gone ({fate})")
    if plan.empty_link_dirs:
        console.print(f"{len(plan.empty_link_dirs)} empty directories (left by API deletes or "
                      "an interrupted run) " + ("were removed." if plan.applied else "go too."))
    if plan.young:
        console.print(f"{len(plan.young)} candidates are younger than the grace period and stay.")
    verb = "Reclaimed" if plan.applied else "Reclaimable"
    console.print(
        f"{verb}: {human_bytes(plan.reclaimable_bytes)} ({len(plan.blobs)} blobs, "
        f"{len(plan.manifests)} manifests, {len(plan.layer_links)} layer links, "
        f"{len(plan.uploads)} uploads, {len(plan.tag_dirs)} tag dirs, "
        f"{len(plan.repositories)} repositories)")
    if not plan.applied and not plan.is_blocked and not plan.empty:
        console.print("Nothing was changed: run again with --apply to move these into the quarantine.")
