"""`regfsck verify`: the fsck."""

from __future__ import annotations

import os
import signal
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from regfsck import exitcodes
from regfsck.cli.app import app
from regfsck.cli.common import (
    CONFIG_OPTION,
    JSON_OPTION,
    ROOT_ARGUMENT,
    default_jobs,
    fail,
    human_bytes,
    open_root,
    print_json,
    show_progress,
    stderr_console,
    stdout_console,
    with_requests,
)
from regfsck.cli.verify_deep import RichDeepProgress, deep_json, render_deep
from regfsck.cli.verify_incremental import (
    CHANGED_ONLY_OPTION,
    MAX_AGE_OPTION,
    MAX_DURATION_OPTION,
    SAMPLE_OPTION,
    incremental_options,
    render_incremental,
)
from regfsck.cli.verify_metrics import METRICS_FILE_OPTION, MetricsRun
from regfsck.findings import Severity
from regfsck.objectstore import default_jobs as s3_default_jobs
from regfsck.record import RecordError
from regfsck.storage import StorageError
from regfsck.verify import (
    DataProgress,
    UnknownRepositoryError,
    VerifyOptions,
    VerifyReport,
    run_verify,
)


class RichDataProgress(DataProgress):
    """A bytes / rate / ETA bar on stderr."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("hashing blobs"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
            TimeRemainingColumn(), console=stderr_console(), transient=True)
        self.task = self.progress.add_task("hash", total=0)
        self._lock = threading.Lock()

    def start(self, total_bytes: int, total_blobs: int) -> None:
        self.progress.update(self.task, total=total_bytes)
        self.progress.start()

    def advance(self, nbytes: int) -> None:
        with self._lock:
            self.progress.advance(self.task, nbytes)

    def finish(self) -> None:
        self.progress.stop()


def stop_on_interrupt(stop: threading.Event) -> Callable[[int, FrameType | None], None]:
    """First Ctrl-C: stop hashing at the next buffer and print what was checked (the scan of
    a huge tree still runs to its end); a second Ctrl-C stops at once, without a summary."""
    def handler(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        os.write(2, b"regfsck: stopping; the summary will cover what was checked "
                    b"(Ctrl-C again to stop at once)\n")
    return handler


@app.command()
def verify(
    root: Path | None = ROOT_ARGUMENT,
    config: Path | None = CONFIG_OPTION,
    json_output: bool = JSON_OPTION,
    jobs: int = typer.Option(0, "--jobs", "-j", help="Hashing threads (default: CPU count; "
                             "on object storage: requests in flight, default 64)."),
    repo: list[str] = typer.Option([], "--repo", help="Check only this repository "
                                   "(repeatable); blobs it uses are re-hashed."),
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
) -> None:
    """Check every link, tag, manifest and blob; exit 1 when anything is broken."""
    if jobs < 0:
        fail("--jobs must be positive", exitcodes.USAGE)
    registry = open_root(root, config, object_storage=True)
    if registry.is_object_storage and deep:
        fail("--deep is not available on object storage yet")
    if registry.is_object_storage and metrics_file is not None:
        fail("--metrics-file is not available on object storage yet")
    if state_dir is not None and not registry.is_object_storage:
        fail("--state-dir is for trees in object storage; a local tree keeps its record in "
             "ROOT/regfsck-state", exitcodes.USAGE)
    if registry.is_object_storage and not jobs:
        jobs = s3_default_jobs()  # requests in flight, not CPU threads
    options = VerifyOptions(jobs=jobs or default_jobs(), repos=set(repo) or None,
                            check_data=not no_data, strict=strict, deep=deep,
                            state_dir=state_dir, **incremental_options(
                                no_data=no_data, changed_only=changed_only, max_age=max_age,
                                sample=sample, max_duration=max_duration))
    metrics = MetricsRun(metrics_file, registry, repo) if metrics_file is not None else None
    stop = threading.Event()
    previous = signal.signal(signal.SIGINT, stop_on_interrupt(stop))
    try:
        show = show_progress(json_output)
        report = run_verify(registry, options, stop=stop,
                            progress=RichDataProgress() if show else None,
                            deep_progress=RichDeepProgress() if show and deep else None,
                            inventory=metrics.scan() if metrics is not None else None)
        deep_summary = report.deep
    except UnknownRepositoryError as exc:
        if metrics is not None:
            metrics.finish(None, exitcodes.USAGE)
        fail(str(exc), exitcodes.USAGE)
    except (RecordError, StorageError) as exc:
        if metrics is not None:
            metrics.finish(None, exitcodes.CANNOT_RUN)
        fail(str(exc))
    finally:
        signal.signal(signal.SIGINT, previous)
    if json_output:
        print_json(with_requests(registry, report.to_json() | deep_json(deep_summary)))
    else:
        render_verify(report)
        render_incremental(report.summary)
        render_deep(deep_summary)
    code = exitcodes.FINDINGS if report.summary.errors else exitcodes.OK
    if report.summary.interrupted:
        stderr_console().print("interrupted: the summary covers only what was checked")
        code = exitcodes.INTERRUPTED
    raise typer.Exit(metrics.finish(report, code) if metrics is not None else code)


_STYLE = {Severity.ERROR: "bold red", Severity.WARNING: "yellow", Severity.INFO: "dim"}
_ORDER = {Severity.ERROR: 0, Severity.WARNING: 1, Severity.INFO: 2}


def render_verify(report: VerifyReport) -> None:
    """One block per finding (severity, kind, where, what), then counts per kind."""
    console = stdout_console()
    for finding in report.findings:
        style = _STYLE[finding.severity]
        where = finding.repo or ""
        if finding.tag:
            where += f":{finding.tag}"
        console.print(Text.assemble((f"{finding.severity:<7} ", style), (finding.kind, "bold"),
                                    f"  {where}" if where else ""))
        console.print(Text(f"        {finding.path}", style="dim"))
        console.print(Text(f"        {finding.message}"))
        if finding.affected_tags:
            console.print(Text(f"        affects tags: {', '.join(finding.affected_tags)}"))
    if report.findings:
        counts = Counter((f.severity, f.kind) for f in report.findings)
        table = Table(title="Findings by kind")
        table.add_column("severity")
        table.add_column("kind")
        table.add_column("count", justify="right")
        for (severity, kind), count in sorted(counts.items(), key=lambda item: (
                _ORDER[item[0][0]], item[0][1])):
            table.add_row(Text(str(severity), style=_STYLE[severity]), kind, str(count))
        console.print(table)
    s = report.summary
    console.print(
        f"{s.errors} errors, {s.warnings} warnings, {s.infos} notes; "
        f"{s.blobs_verified} blobs re-hashed ({human_bytes(s.bytes_verified)})")
