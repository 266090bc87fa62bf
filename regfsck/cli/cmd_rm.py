"""`regfsck rm`: remove tags, manifests or whole repositories offline (undoable)."""

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
    fail,
    human_bytes,
    open_root,
    print_json,
    shown,
    stderr_console,
    stdout_console,
)
from regfsck.cli.sweeping import after_apply_text, guarded, run_sweep
from regfsck.rm import RmPlan, RmRefError, plan_rm
from regfsck.root import RegistryRoot

ARGS = typer.Argument(..., metavar="ROOT REF...", show_default=False,
                      help="The registry storage root (omit it with --config), then one or more of "
                      "repo:tag (that tag only), repo@sha256:... (the manifest and the tags on it), "
                      "repo (the whole repository).")


@app.command()
def rm(
    args: list[str] = ARGS,
    config: Path | None = CONFIG_OPTION,
    force: bool = typer.Option(False, "--force", help="Remove a manifest even when a remaining "
                               "index of the repository lists it as a child (breaks that image)."),
    apply: bool = APPLY_OPTION,
    json_output: bool = JSON_OPTION,
) -> None:
    """Remove tags, manifests or repositories; then `regfsck gc` frees the blobs."""
    values = list(args)
    root = None if config is not None else Path(values.pop(0))
    if not values:
        fail("give at least one REF (repo:tag, repo@sha256:... or repo)", exitcodes.USAGE)
    registry = open_root(root, config)
    if not apply:
        plan = _plan(registry, values, force)
        _output(plan, json_output, [])
        raise typer.Exit(exitcodes.CANNOT_RUN if plan.is_blocked else exitcodes.OK)
    with guarded(registry, json_output) as recovered:
        plan = _plan(registry, values, force)
        if plan.is_blocked:
            _output(plan, json_output, recovered)
            raise typer.Exit(exitcodes.CANNOT_RUN)
        result = run_sweep(registry, "rm", {"refs": plan.refs, "force": force}, plan.removal_list,
                           plan.empty_dirs, grace=timedelta(0),
                           revalidate=None, json_output=json_output)
    plan.applied = result.run_id is not None
    plan.run_id = result.run_id
    plan.apply_result = result.to_json()
    _output(plan, json_output, recovered)
    if not json_output:
        for line in after_apply_text(registry, result):
            stderr_console().print(line, highlight=False)
        stderr_console().print(f"Run `regfsck gc {registry.root} --apply` to free the blobs.")
    raise typer.Exit(exitcodes.INTERRUPTED if result.interrupted else exitcodes.OK)


def _plan(registry: RegistryRoot, refs: list[str], force: bool) -> RmPlan:
    try:
        return plan_rm(registry, refs, force=force)
    except RmRefError as exc:
        fail(str(exc), exitcodes.USAGE)


def _output(plan: RmPlan, json_output: bool, recovered: list[str]) -> None:
    if json_output:
        print_json({**plan.to_json(), "recovered": recovered})
        return
    console = stdout_console()
    table = Table(title="Removed" if plan.applied else "Would remove")
    for column in ("what", "name", "note"):
        table.add_column(column, overflow="fold")
    for repo in plan.repositories:
        links = sum(1 for r, _ in plan.layer_links if r == repo)
        uploads = sum(1 for r, _, _ in plan.uploads if r == repo)
        table.add_row("repository", shown(repo), f"with {links} layer links, {uploads} uploads")
    for repo, digest, tags in plan.manifests:
        table.add_row("manifest", shown(f"{repo}@{digest}"),
                      f"tags: {', '.join(tags)}" if tags else "untagged")
    for repo, tag, was in plan.tags:
        table.add_row("tag", shown(f"{repo}:{tag}"), f"was {was}" if was else "")
    console.print(table)
    for repo, digest, subject in plan.orphaned_referrers:
        console.print(f"note: referrer {shown(repo)}@{digest} loses its subject {subject} "
                      "(gc --delete-untagged removes it unless it is tagged)")
    for reason in plan.refused:
        console.print(f"[bold red]refused:[/] {reason}")
    console.print(f"The next `regfsck gc` frees {human_bytes(plan.reclaimable_bytes)}; "
                  f"`regfsck gc --delete-untagged` frees "
                  f"{human_bytes(plan.reclaimable_bytes_delete_untagged)} because of this.")
    if not plan.applied and not plan.is_blocked:
        console.print("Nothing was changed: run again with --apply to move these into the quarantine.")
