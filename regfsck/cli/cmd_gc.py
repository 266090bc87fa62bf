"""`regfsck gc`: the collector operators can trust; a plan by default, undoable with --apply."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from regfsck.cli.app import command
from regfsck.cli.common import (
    APPLY_OPTION,
    BREAK_LOCK_OPTION,
    CONFIG_OPTION,
    JSON_OPTION,
    NO_REGISTRY_CHECK_OPTION,
    REGISTRY_URL_OPTION,
    ROOT_ARGUMENT,
    for_changes,
    human_bytes,
    note,
    open_root,
    plural,
    print_json,
    root_words,
    say,
    styled,
    table,
    warn,
    with_requests,
)
from regfsck.errors import ExitCode

if TYPE_CHECKING:
    from regfsck.gc import GcPlan
    from regfsck.root import RegistryRoot
    from regfsck.sweep import Applied


@command()
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
    registry_url: list[str] | None = REGISTRY_URL_OPTION,
    no_registry_check: bool = NO_REGISTRY_CHECK_OPTION,
    break_lock: bool = BREAK_LOCK_OPTION,
) -> None:
    """Remove what no image needs: unreferenced blobs, dead links, stale uploads (undoable)."""
    registry = for_changes(open_root(root, config, object_storage=True), registry_url,
                           no_registry_check, break_lock)
    from regfsck.cli.sweeping import after_apply_text, show_recovered, sweep_controls
    from regfsck.durations import parse_duration
    from regfsck.gc import GcOptions, plan_gc
    from regfsck.quarantine import QuarantineError, list_runs
    from regfsck.safety import registry_users
    from regfsck.scanner import Depth
    from regfsck.sweep import apply_gc

    options = GcOptions(delete_untagged=delete_untagged,
                        uploads_older_than=parse_duration(uploads_older_than,
                                                           "--uploads-older-than"),
                        grace=parse_duration(grace, "--grace"), force=force)
    if not apply and registry.is_object_storage:
        plan = plan_gc(registry, options, depth=Depth.LIST)
        _output(plan, json_output, [], registry)
        raise typer.Exit(ExitCode.CANNOT_RUN if plan.is_blocked else ExitCode.OK)
    if not apply:
        users = registry_users(registry)
        if users:
            note(f"note: {plural(len(users), 'process', 'processes')} may be using this tree "
                 f"({users[0]}); the plan may already be stale.")
        try:
            pending = [r.run_id for r in list_runs(registry) if r.status in ("running", "undoing")]
        except QuarantineError as exc:
            pending = []
            warn(f"note: {exc}; --apply will refuse until it is fixed")
        if pending:
            note(f"note: run {pending[0]} was interrupted; the next --apply recovers it first.")
        plan = plan_gc(registry, options, depth=Depth.LIST)
        _output(plan, json_output, [], registry)
        raise typer.Exit(ExitCode.CANNOT_RUN if plan.is_blocked else ExitCode.OK)
    with sweep_controls(json_output) as (stop, on_start):
        applied = apply_gc(registry, options, stop=stop, on_recovered=show_recovered(json_output),
                           on_start=on_start)
    _output(applied.plan, json_output, applied.recovered, registry, applied)
    if applied.result is None:  # blocked: nothing was changed
        raise typer.Exit(ExitCode.CANNOT_RUN)
    if not json_output:
        for line in after_apply_text(registry, applied.result):
            note(line)
    raise typer.Exit(ExitCode.INTERRUPTED if applied.interrupted else ExitCode.OK)


def _output(plan: GcPlan, json_output: bool, recovered: list[str],
            registry: RegistryRoot, applied: Applied[GcPlan] | None = None) -> None:
    if json_output:
        doc = {**(applied or plan).to_json(), "recovered": recovered}
        print_json(with_requests(registry, doc) if registry is not None else doc)
    else:
        render_plan(plan, root_words(registry), applied.run_id if applied else None)


def render_plan(plan: GcPlan, root: str = "ROOT", run_id: str | None = None) -> None:
    """The plan, or with the `run_id` of the run that carried it out, what went."""
    applied = run_id is not None
    from regfsck.durations import format_duration

    mode = ("--delete-untagged: marking from tags only" if plan.options.delete_untagged
            else "marking from every manifest revision")
    say(f"gc plan ({mode}; grace {format_duration(plan.options.grace)}, uploads older "
        f"than {format_duration(plan.options.uploads_older_than)})")
    if plan.blocked:
        table("Damage that makes marking unreliable"
              + (" (--force given: collecting anyway, LOSSY)" if plan.options.force else ""),
              ("kind", "where", "message"),
              [(f.kind, f.path, f.message) for f in plan.blocked])
        if not plan.options.force:
            say(styled("gc refuses to collect this tree.", "bold red"),
                f" Fix the damage first (`regfsck verify {root}`, then `regfsck repair {root}` "
                "or restore), or pass --force to collect anyway and accept losing blobs only "
                "damaged manifests need.")
    if plan.per_repository:
        table("What would go, per repository" if not applied else "What went",
              ("repository", "manifests", "layer links", "uploads", "tag dirs", "bytes"),
              [(name, str(u.manifests), str(u.layer_links), str(u.uploads), str(u.tag_dirs),
                human_bytes(u.reclaimable_bytes))
               for name, u in sorted(plan.per_repository.items())],
              right=("manifests", "layer links", "uploads", "tag dirs", "bytes"))
    rows: list[tuple[str, str, str, str]] = []
    rows += [("blob", b.digest, b.reason, human_bytes(b.size)) for b in plan.blobs]
    rows += [("manifest", f"{m.repo}@{m.digest}", m.reason, "") for m in plan.manifests]
    rows += [("layer link", f"{link.repo} -> {link.target}", link.reason, "") for link in plan.layer_links]
    rows += [("upload", f"{u.repo} {u.id}", u.reason, human_bytes(u.size)) for u in plan.uploads]
    rows += [("tag dir", f"{r}:{t}", "left empty", "") for r, t in plan.tag_dirs]
    rows += [("repository", r, "left empty", "") for r in plan.repositories]
    if rows:
        table("Details", ("what", "name", "why", "size"), rows, right=("size",),
              more_hint="; so does --json")
    for orphan in plan.orphan_referrers:
        fate = "kept" if orphan.kept else "removed with the untagged manifests"
        say(f"referrer {orphan.repo}@{orphan.digest}: its subject {orphan.subject} is gone "
            f"({fate})")
    if plan.empty_link_dirs:
        say(f"{plural(len(plan.empty_link_dirs), 'empty directory', 'empty directories')} (left "
            "by API deletes or an interrupted run) " + ("were removed." if applied else "go too."))
    if plan.young:
        say(f"{plural(len(plan.young), 'candidate')} younger than the grace period "
            f"{'stays' if len(plan.young) == 1 else 'stay'}.")
    counts = (f"{plural(len(plan.blobs), 'blob')}, {plural(len(plan.manifests), 'manifest')}, "
              f"{plural(len(plan.layer_links), 'layer link')}, {plural(len(plan.uploads), 'upload')}, "
              f"{plural(len(plan.tag_dirs), 'tag dir')}, "
              f"{plural(len(plan.repositories), 'repository', 'repositories')}")
    if applied:
        say(f"Moved to quarantine: {human_bytes(plan.reclaimable_bytes)} ({counts}); "
            f"freed once purged: regfsck purge {root} {run_id} --apply")
    else:
        say(f"Reclaimable: {human_bytes(plan.reclaimable_bytes)} ({counts})")
    if not applied and not plan.is_blocked and not plan.empty:
        say("Nothing was changed: run again with --apply to move these into the quarantine.")
