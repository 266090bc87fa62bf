"""`regfsck rm`: remove tags, manifests or whole repositories offline (undoable)."""

from __future__ import annotations

import os
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
    fail,
    for_changes,
    human_bytes,
    note,
    open_root,
    print_json,
    root_words,
    say,
    styled,
    table,
    with_requests,
)
from regfsck.errors import ExitCode

if TYPE_CHECKING:
    from regfsck.rm import RmPlan
    from regfsck.root import RegistryRoot
    from regfsck.sweep import Applied

ARGS = typer.Argument(..., metavar="ROOT REF...", show_default=False,
                      help="The registry storage root (omit it with --config), then one or more of "
                      "repo:tag (that tag only), repo@sha256:... (the manifest and the tags on it; "
                      "a unique digest prefix will do), repo (the whole repository).")


def _looks_like_ref(value: str) -> bool:
    """`app/web:stable` or `app@sha256:...` given where ROOT belongs (and no such directory)."""
    return (":" in value or "@" in value) and not value.startswith(("/", ".")) \
        and "://" not in value and not os.path.exists(value)


@command()
def rm(
    args: list[str] = ARGS,
    config: Path | None = CONFIG_OPTION,
    force: bool = typer.Option(False, "--force", help="Remove a manifest even when a remaining "
                               "index of the repository lists it as a child (breaks that image)."),
    apply: bool = APPLY_OPTION,
    json_output: bool = JSON_OPTION,
    registry_url: list[str] | None = REGISTRY_URL_OPTION,
    no_registry_check: bool = NO_REGISTRY_CHECK_OPTION,
    break_lock: bool = BREAK_LOCK_OPTION,
) -> None:
    """Remove tags, manifests or repositories; then `regfsck gc` frees the blobs."""
    values = list(args)
    if config is None and _looks_like_ref(values[0]):
        fail(f"ROOT is missing: {values[0]!r} is a REF, not a directory; give the registry "
             f"storage root first (regfsck rm ROOT {values[0]}) or --config", ExitCode.USAGE)
    root = None if config is not None else Path(values.pop(0))
    if not values:
        fail("give at least one REF after ROOT (repo:tag, repo@sha256:... or repo)",
             ExitCode.USAGE)
    registry = for_changes(open_root(root, config, object_storage=True), registry_url,
                           no_registry_check, break_lock)
    from regfsck.cli.sweeping import after_apply_text, show_recovered, sweep_controls

    if not apply:
        plan = _plan(registry, values, force)
        _output(registry, plan, json_output, [])
        raise typer.Exit(ExitCode.CANNOT_RUN if plan.is_blocked else ExitCode.OK)
    from regfsck.sweep import apply_rm

    with sweep_controls(json_output) as (stop, on_start):
        applied = apply_rm(registry, values, force=force, stop=stop,
                           on_recovered=show_recovered(json_output), on_start=on_start)
    plan = applied.plan
    _output(registry, plan, json_output, applied.recovered, applied)
    if applied.result is None:  # blocked: nothing was changed
        raise typer.Exit(ExitCode.CANNOT_RUN)
    if not json_output:
        for line in after_apply_text(registry, applied.result):
            note(line)
        for line in gc_hint(plan, root_words(registry)):
            note(line)
    raise typer.Exit(ExitCode.INTERRUPTED if applied.interrupted else ExitCode.OK)


def gc_hint(plan: RmPlan, root: str) -> list[str]:
    """Which gc frees the blobs: the default one, or only --delete-untagged (an untagged
    manifest keeps its blobs under the default mark), or none."""
    if plan.reclaimable_bytes:
        return [f"Free the blobs: regfsck gc {root} --apply"]
    if plan.reclaimable_bytes_delete_untagged:
        return ["The default gc frees nothing here: the manifests left untagged keep their "
                "blobs. Collect them with:",
                f"  regfsck gc {root} --delete-untagged --apply"]
    return ["No blob is freed: other images still use them."]


def _plan(registry: RegistryRoot, refs: list[str], force: bool) -> RmPlan:
    from regfsck.rm import plan_rm

    return plan_rm(registry, refs, force=force)


def _output(registry: RegistryRoot, plan: RmPlan, json_output: bool, recovered: list[str],
            applied: Applied[RmPlan] | None = None) -> None:
    if json_output:
        print_json(with_requests(registry, {**(applied or plan).to_json(),
                                            "recovered": recovered}))
        return
    done = applied is not None and applied.applied
    rows: list[tuple[str, str, str]] = []
    for repo in plan.repositories:
        links = sum(1 for r, _ in plan.layer_links if r == repo)
        uploads = sum(1 for r, _, _ in plan.uploads if r == repo)
        rows.append(("repository", repo, f"with {links} layer links, {uploads} uploads"))
    for repo, digest, tags in plan.manifests:
        rows.append(("manifest", f"{repo}@{digest}", f"tags: {', '.join(tags)}" if tags else "untagged"))
    for repo, tag, was in plan.tags:
        rows.append(("tag", f"{repo}:{tag}", f"was {was}" if was else ""))
    table("Removed" if done else "Would remove", ("what", "name", "note"), rows)
    for repo, digest, subject in plan.orphaned_referrers:
        say(f"note: referrer {repo}@{digest} loses its subject {subject} "
            "(gc --delete-untagged removes it unless it is tagged)")
    for reason in plan.refused:
        say(styled("refused: ", "bold red"), reason)
    say(f"The next `regfsck gc` frees {human_bytes(plan.reclaimable_bytes)}; "
        f"`regfsck gc --delete-untagged` frees "
        f"{human_bytes(plan.reclaimable_bytes_delete_untagged)} because of this.")
    if not done and not plan.is_blocked:
        say("Nothing was changed: run again with --apply to move these into the quarantine.")
