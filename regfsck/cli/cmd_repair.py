"""`regfsck repair`: provable fixes for verify's findings, planned first, applied with --apply."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from regfsck.cli.app import command
from regfsck.cli.common import (
    APPLY_OPTION,
    BREAK_LOCK_OPTION,
    CONFIG_OPTION,
    JOBS_OPTION,
    JSON_OPTION,
    NO_REGISTRY_CHECK_OPTION,
    REGISTRY_URL_OPTION,
    ROOT_ARGUMENT,
    CtrlC,
    changes_tested_on,
    default_jobs,
    fail,
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
from regfsck.cli.verify_incremental import CHANGED_ONLY_OPTION, MAX_AGE_OPTION, incremental_options
from regfsck.errors import ExitCode
from regfsck.findings import Severity

if TYPE_CHECKING:
    from regfsck.repair import RepairResult
    from regfsck.sources import Source

_ACTION_LABEL = {
    "rewrite_link": "rewrite link", "create_link": "create link",
    "move_blob_home": "move blob home", "drop_stray_copy": "quarantine stray copy",
    "replace_blob": "replace blob", "restore_blob": "restore blob",
    "quarantine_blob": "quarantine blob",
}


@command()
def repair(
    root: Path | None = ROOT_ARGUMENT,
    config: Path | None = CONFIG_OPTION,
    sources: list[Path] = typer.Option([], "--from", metavar="BACKUP", help="A good copy to "
                                       "take blobs from: another registry root, an OCI layout "
                                       "directory or an OCI archive (.tar, .tar.gz, .tar.zst); "
                                       "tried in order.", show_default=False),
    apply: bool = APPLY_OPTION,
    json_output: bool = JSON_OPTION,
    jobs: int = JOBS_OPTION,
    no_data: bool = typer.Option(False, "--no-data", help="Skip re-hashing blob content: "
                                 "content damage is then neither found nor fixed."),
    changed_only: bool = CHANGED_ONLY_OPTION,
    max_age: str | None = MAX_AGE_OPTION,
    restore_deleted: bool = typer.Option(False, "--restore-deleted", help="Also bring back "
                                         "index children deleted from their repository "
                                         "(index_child_deleted): by default a deliberate "
                                         "delete is left alone."),
    registry_url: list[str] | None = REGISTRY_URL_OPTION,
    no_registry_check: bool = NO_REGISTRY_CHECK_OPTION,
    break_lock: bool = BREAK_LOCK_OPTION,
) -> None:
    """Plan exact fixes for verify's findings; apply them (undoably) with --apply."""
    if jobs < 0:
        fail("--jobs must be positive", ExitCode.USAGE)
    registry = for_changes(open_root(root, config, object_storage=True), registry_url,
                           no_registry_check, break_lock)
    changes_tested_on(registry, "repair", ("s3",), apply)
    if registry.is_object_storage and not jobs:
        from regfsck.objectstore import default_jobs as s3_default_jobs

        jobs = s3_default_jobs()  # requests in flight, not CPU threads
    from regfsck.repair import open_sources, run_repair
    from regfsck.verify import VerifyOptions

    check = VerifyOptions(jobs=jobs or default_jobs(), check_data=not no_data,
                          **incremental_options(no_data=no_data, changed_only=changed_only,
                                                max_age=max_age, sample=None, max_duration=None))
    opened: list[Source] = open_sources(sources)
    ctrl_c = CtrlC()
    try:
        result = run_repair(registry, opened, apply=apply, check=check, stop=ctrl_c.stop,
                            restore_deleted=restore_deleted)
    finally:
        ctrl_c.restore()
        for source in opened:
            source.close()
    if json_output:
        print_json(with_requests(registry, result.to_json()))
    else:
        render_repair(result, root_words(registry), object_storage=registry.is_object_storage)
    if result.interrupted:
        raise typer.Exit(ExitCode.INTERRUPTED)
    raise typer.Exit(_exit_code(result))


def _exit_code(result: RepairResult) -> int:
    if result.applied:
        errors = any(f.severity is Severity.ERROR for f in result.remaining)
        return ExitCode.FINDINGS if errors else ExitCode.OK
    plan = result.plan
    errors = any(u.finding.severity is Severity.ERROR for u in plan.unfixable)
    return ExitCode.FINDINGS if plan.fixes or errors else ExitCode.OK


def render_repair(result: RepairResult, root: str, *, object_storage: bool = False) -> None:
    plan = result.plan
    for message in result.recovered:
        say(styled("recovered: ", "yellow"), message)
    if plan.blobs_skipped:
        say(f"{plural(plan.blobs_skipped, 'blob')} ({human_bytes(plan.bytes_skipped)}) not "
            "re-hashed: unchanged since their last good verdict (--changed-only)")
    if plan.fixes:
        title = "Fixes applied" if result.applied else "Fixes (run with --apply to make them)"
        columns = ("action", "where", "why") + (("status",) if result.applied else ())
        rows = []
        for i, fix in enumerate(plan.fixes):
            row = [_ACTION_LABEL.get(fix.action, fix.action), fix.to_json()["path"], fix.reason]
            if result.applied:
                outcome = result.outcome(i)
                row.append("planned" if outcome is None else
                           outcome.status + (f": {outcome.note}" if outcome.note else ""))
            rows.append(row)
        table(title, columns, rows)
    else:
        say("nothing regfsck can fix for certain")
    if plan.lost:
        table("Blobs lost: push these images again", ("blob", "state", "images to push again"),
              [(blob.digest, blob.why, ", ".join(blob.images) or "none") for blob in plan.lost])
    if plan.unfixable:
        unfixable: list[tuple[str, str, str]] = []
        for item in plan.unfixable:
            where = item.finding.repo or ""
            if item.finding.tag:
                where += f":{item.finding.tag}"
            unfixable.append((item.finding.kind, f"{where} {item.finding.path}".strip(), item.advice))
        table("Not fixable by regfsck", ("kind", "where", "what you can do"), unfixable)
    statuses = [o.status if o else "planned" for o in map(result.outcome, range(len(plan.fixes)))]
    restored = sum(f.size or 0 for f, status in zip(plan.fixes, statuses, strict=True)
                   if f.source and status != "skipped")
    if restored:
        say(f"{human_bytes(restored)} taken from {', '.join(plan.sources)}")
    if not result.applied:
        if plan.fixes:
            say(f"{plural(len(plan.fixes), 'fix', 'fixes')} planned; nothing was changed "
                "(add --apply to make them)")
            # On object storage regfsck cannot see the registry: it must be told how to ask.
            check = (" --registry-url URL (a registry in read-only mode or stopped)"
                     if object_storage else "")
            # The dry run just recorded every verdict: the apply need not read the store again.
            again = " --changed-only" if plan.verdicts_recorded else ""
            note(f"Next: stop the registry, then: regfsck repair {root}"
                 + "".join(f" --from {shlex.quote(s)}" for s in plan.sources) + " --apply"
                 + again + check)
        if plan.repush:
            note("Then push again: " + " ".join(plan.repush))
        return
    applied = statuses.count("applied")
    if result.run_id:
        say(f"{plural(applied, 'fix', 'fixes')} applied in run {result.run_id}; "
            f"revert with: regfsck undo {root} {result.run_id}")
        warn(styled("Restart the registry before it serves again", "yellow"), ": its "
             "blob-descriptor cache still remembers the old state.")
    if result.interrupted:
        say(styled("interrupted: the remaining fixes were not applied", "yellow"))
    if plan.repush:
        note("Push these images again (their blobs are gone): " + " ".join(plan.repush))
    errors = [f for f in result.remaining if f.severity is Severity.ERROR]
    if result.remaining:
        say(f"after repair, verify (structure) still reports {plural(len(errors), 'error')} and "
            f"{plural(len(result.remaining) - len(errors), 'warning')} (listed above as not "
            "fixable)")
    else:
        say("after repair, verify (structure) reports nothing")
