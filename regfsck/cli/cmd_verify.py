"""`regfsck verify`: the fsck."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from regfsck.cli.app import command
from regfsck.cli.common import (
    CONFIG_OPTION,
    JSON_OPTION,
    ROOT_ARGUMENT,
    SETTINGS,
    CtrlC,
    alert,
    default_jobs,
    fail,
    human_bytes,
    json_bytes,
    note,
    open_root,
    plural,
    print_json,
    root_words,
    say,
    show_progress,
    stdout_is_terminal,
    styled,
    table,
    with_requests,
)
from regfsck.cli.verify_incremental import (
    CHANGED_ONLY_OPTION,
    MAX_AGE_OPTION,
    MAX_DURATION_OPTION,
    SAMPLE_OPTION,
    incremental_options,
    render_incremental,
)
from regfsck.cli.verify_metrics import METRICS_FILE_OPTION
from regfsck.errors import ExitCode, RegfsckError
from regfsck.findings import BLOB_KINDS, CATALOG, Finding, Severity
from regfsck.layout import STATE_DIR

if TYPE_CHECKING:
    from regfsck.deep import DeepProgress
    from regfsck.root import RegistryRoot
    from regfsck.verify import DataProgress, VerifyReport


def data_progress() -> DataProgress:
    """A bytes / rate / ETA bar on stderr (IEC units, like the summary)."""
    from regfsck.cli.common import ByteBar
    from regfsck.verify import DataProgress

    class RichDataProgress(ByteBar, DataProgress):
        pass

    return RichDataProgress("hashing blobs")


def deep_progress() -> DeepProgress:
    from regfsck.cli.verify_deep import RichDeepProgress  # rich.progress and deep: --deep only

    return RichDeepProgress()


def _awareness(registry: RegistryRoot) -> None:
    """Say what else is at work on ROOT: findings may be its work in progress."""
    from regfsck.safety import LockHeldError, RootLock, registry_users

    try:
        RootLock(registry).raise_if_held()
    except LockHeldError as exc:
        note(f"note: {exc}; what it has half done (an import's blobs without links, a gc's "
             "moves) can show up as findings below")
    users = registry_users(registry)
    if users:
        note(f"note: {plural(len(users), 'process', 'processes')} may be using this tree "
             f"({users[0]}); a registry writing now can make findings that are only a push "
             "in flight")


@command()
def verify(
    root: Path | None = ROOT_ARGUMENT,
    config: Path | None = CONFIG_OPTION,
    json_output: bool = JSON_OPTION,
    jobs: int = typer.Option(0, "--jobs", "-j", metavar="N", show_default=False,
                             help="Hashing threads (default: the number of CPUs; on object "
                             "storage: requests in flight, default 64)."),
    repo: list[str] = typer.Option([], "--repo", metavar="REPO", help="Check only this "
                                   "repository; blobs it uses are re-hashed.", show_default=False),
    no_data: bool = typer.Option(False, "--no-data", help="Skip re-hashing blob content "
                                 "(structure only)."),
    strict: bool = typer.Option(False, "--strict", help="Treat tags without current/link, "
                                "dangling _layers links and referrers without subject as errors."),
    deep: bool = typer.Option(False, "--deep", help="Also decompress every layer: check it against "
                              "its config's diff_id and that it is a readable tar."),
    changed_only: bool = CHANGED_ONLY_OPTION,
    max_age: str | None = MAX_AGE_OPTION,
    sample: float | None = SAMPLE_OPTION,
    max_duration: str | None = MAX_DURATION_OPTION,
    state_dir: Path | None = typer.Option(
        None, "--state-dir", metavar="DIR", help="Object storage: keep the verification record "
        "under DIR (default $XDG_STATE_HOME/regfsck, i.e. ~/.local/state/regfsck). A local tree "
        "keeps it in ROOT/regfsck-state.", show_default=False),
    metrics_file: Path | None = METRICS_FILE_OPTION,
    shard: str | None = typer.Option(
        None, "--shard", metavar="K/N", help="Hash only shard K of N (0 <= K < N) of the blobs, "
        "chosen by digest, and report only the findings this shard owns; `/N` takes K from "
        "$JOB_COMPLETION_INDEX (a Kubernetes Indexed Job). Combine the N reports with "
        "`regfsck report merge` (docs/sharding.md).", show_default=False),
    output: Path | None = typer.Option(
        None, "--output", "-o", metavar="PATH", help="Also write the --json document to PATH "
        "(whole or not at all).", show_default=False),
) -> None:
    """Check every link, tag, manifest and blob; exit 1 when anything is broken."""
    if jobs < 0:
        fail("--jobs must be positive", ExitCode.USAGE)
    from regfsck.report import parse_shard

    shard_part = parse_shard(shard) if shard is not None else None
    registry = open_root(root, config, object_storage=True)
    if state_dir is not None and not registry.is_object_storage:
        fail("--state-dir is for trees in object storage; a local tree keeps its record in "
             f"ROOT/{STATE_DIR}", ExitCode.USAGE)
    if registry.is_object_storage and not jobs:
        from regfsck.objectstore import default_jobs as s3_default_jobs

        jobs = s3_default_jobs()  # requests in flight, not CPU threads
    from regfsck.cli.verify_metrics import MetricsRun
    from regfsck.verify import VerifyOptions, run_verify

    if not registry.is_object_storage:
        _awareness(registry)
    options = VerifyOptions(jobs=jobs or default_jobs(), repos=set(repo) or None,
                            check_data=not no_data, strict=strict, deep=deep,
                            state_dir=state_dir, shard=shard_part, **incremental_options(
                                no_data=no_data, changed_only=changed_only, max_age=max_age,
                                sample=sample, max_duration=max_duration))
    metrics = MetricsRun(metrics_file, registry, repo) if metrics_file is not None else None
    ctrl_c = CtrlC(notice="stopping; the summary will cover what was checked "
                          "(Ctrl-C again to stop at once)")
    try:
        show = show_progress(json_output)
        report = run_verify(registry, options, stop=ctrl_c.stop,
                            progress=data_progress() if show else None,
                            deep_progress=deep_progress() if show and deep else None,
                            inventory=metrics.scan(jobs if registry.is_object_storage else None)
                            if metrics is not None else None,
                            storage=metrics.storage if metrics is not None else None)
        deep_summary = report.deep
    except RegfsckError as exc:  # the metrics file records the failed run, then the app says why
        if metrics is not None:
            metrics.finish(None, exc.exit_code)
        raise
    finally:
        ctrl_c.restore()
    document = with_requests(registry, report.to_json()
                             | ({"deep": deep_summary.to_json()} if deep_summary else {}))
    if output is not None:
        from regfsck.report import write_atomically

        write_atomically(output, json_bytes(document))
    if json_output:
        print_json(document)
    else:
        if shard_part is not None:
            note(f"shard {shard_part}: the blobs and findings this shard owns; combine the "
                 f"{shard_part.count} reports (--output) with `regfsck report merge`")
        render_verify(report)
        render_incremental(report.summary)
        if deep_summary is not None:
            from regfsck.cli.verify_deep import render_deep

            render_deep(deep_summary)
        if not report.summary.interrupted:
            for line in next_steps(report.findings, root_words(registry)):
                note(line)
    code = ExitCode.FINDINGS if report.summary.errors else ExitCode.OK
    if report.summary.interrupted:
        alert("interrupted: the summary covers only what was checked")
        code = ExitCode.INTERRUPTED
    raise typer.Exit(metrics.finish(report, code) if metrics is not None else code)


_STYLE = {Severity.ERROR: "bold red", Severity.WARNING: "yellow", Severity.INFO: "dim"}
_ORDER = {Severity.ERROR: 0, Severity.WARNING: 1, Severity.INFO: 2}


def _where(finding: Finding) -> str:
    where = finding.repo or ""
    if finding.tag:
        where += f":{finding.tag}"
    return where


def render_verify(report: VerifyReport) -> None:
    """On a terminal one block per finding (severity, kind, where, path, what, tags), then
    counts per kind. Piped: one tab-separated line per finding with the full path."""
    findings = report.findings
    if not stdout_is_terminal():
        if findings:
            table("Findings", ("severity", "kind", "where", "path", "message", "affected tags"),
                  [(str(f.severity), f.kind, _where(f), f.path, f.message,
                    " ".join(f.affected_tags)) for f in findings])
    else:
        for finding in findings:
            where = _where(finding)
            say(styled(f"{finding.severity:<7} ", _STYLE[finding.severity]),
                styled(finding.kind, "bold"), f"  {where}" if where else "")
            say(styled(f"        {finding.path}", "dim"))
            say(f"        {finding.message}")
            if finding.affected_tags:
                say(f"        affects: {', '.join(finding.affected_tags)}")
        if findings:
            counts = Counter((f.severity, f.kind) for f in findings)
            table("Findings by kind", ("severity", "kind", "count"), [
                (styled(str(severity), _STYLE[severity]), kind, str(count))
                for (severity, kind), count in sorted(counts.items(), key=lambda item: (
                    _ORDER[item[0][0]], item[0][1]))], right=("count",))
    s = report.summary
    say(f"{plural(s.errors, 'error')}, {plural(s.warnings, 'warning')}, "
        f"{plural(s.infos, 'note')}; {plural(s.blobs_verified, 'blob')} re-hashed "
        f"({human_bytes(s.bytes_verified)})")


def next_steps(findings: list[Finding], root: str) -> list[str]:
    """What to do about these findings, as exact command lines (stderr, silenced by -q)."""
    errors = [f for f in findings if f.severity is Severity.ERROR]
    lines: list[str] = []
    if errors:
        blob_damage = [f for f in errors if f.kind in BLOB_KINDS]
        lines.append("Next: see the exact fixes regfsck can make (nothing changes without --apply):")
        lines.append(f"  regfsck repair {root}")
        if blob_damage:
            images = sorted({t for f in blob_damage for t in f.affected_tags})
            lines.append("Damaged or missing blobs: restore them from a good copy (another "
                         "registry root, an OCI layout or an archive from `regfsck export`):")
            lines.append(f"  regfsck repair {root} --from BACKUP --apply")
            lines.append("or, without a backup, quarantine them and push the images that need "
                         "them again (the next push uploads the blobs):")
            lines.append(f"  regfsck repair {root} --apply")
            if images:
                shown = images if SETTINGS.verbose or len(images) <= 20 else images[:20]
                lines.append(f"  then push again: {' '.join(shown)}"
                             + (f" (and {len(images) - len(shown)} more; -v lists all)"
                                if len(shown) < len(images) else ""))
        else:
            lines.append(f"  regfsck repair {root} --apply")
        lines.append("Stop the registry before --apply, restart it afterwards.")
    elif any(CATALOG[f.kind].gc_removes for f in findings):
        lines.append("Next: stale uploads and dead links go with the collector:")
        lines.append(f"  regfsck gc {root}        (the plan)")
        lines.append(f"  regfsck gc {root} --apply")
    elif not findings:
        lines.append("Nothing to do: the tree is consistent.")
    return lines
