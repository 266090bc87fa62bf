"""`verify --deep`: run the layer engine after verify's own checks, into the same report."""

from __future__ import annotations

import threading
from typing import Any

from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from regfsck.checks import FindingSet
from regfsck.cli.common import human_bytes, stderr_console, stdout_console
from regfsck.deep import DeepProgress, DeepSummary, run_deep
from regfsck.findings import Severity
from regfsck.root import RegistryRoot
from regfsck.verify import VerifyOptions, VerifyReport

_ORDER = {Severity.ERROR: 0, Severity.WARNING: 1, Severity.INFO: 2}


class RichDeepProgress(DeepProgress):
    """Compressed layer bytes read / rate / ETA on stderr."""

    def __init__(self) -> None:
        self.progress = Progress(TextColumn("checking layers"), BarColumn(), DownloadColumn(),
                                 TransferSpeedColumn(), TimeRemainingColumn(),
                                 console=stderr_console(), transient=True)
        self.task = self.progress.add_task("deep", total=0)
        self._lock = threading.Lock()

    def start(self, total_bytes: int, total_layers: int) -> None:
        self.progress.update(self.task, total=total_bytes)
        self.progress.start()

    def advance(self, nbytes: int) -> None:
        with self._lock:
            self.progress.advance(self.task, nbytes)

    def finish(self) -> None:
        self.progress.stop()


def add_deep(report: VerifyReport, registry: RegistryRoot, options: VerifyOptions,
             stop: threading.Event, show_bar: bool) -> DeepSummary | None:
    """Run the deep layer checks and merge their findings and counts into `report`."""
    if report.summary.interrupted:
        return None
    deep = run_deep(registry, jobs=options.jobs, repos=options.repos, stop=stop,
                    progress=RichDeepProgress() if show_bar else None)
    merged = FindingSet()
    merged.extend(report.findings)
    merged.extend(deep.findings)
    report.findings = sorted(merged.findings(), key=lambda f: (_ORDER[f.severity], f.kind, f.path))
    summary = report.summary
    summary.errors = sum(f.severity is Severity.ERROR for f in report.findings)
    summary.warnings = sum(f.severity is Severity.WARNING for f in report.findings)
    summary.infos = sum(f.severity is Severity.INFO for f in report.findings)
    summary.interrupted = summary.interrupted or deep.summary.interrupted
    return deep.summary


def deep_json(summary: DeepSummary | None) -> dict[str, Any]:
    """The `deep` member of verify's JSON (absent without --deep)."""
    return {"deep": summary.to_json()} if summary is not None else {}


def render_deep(summary: DeepSummary | None) -> None:
    if summary is not None:
        stdout_console().print(
            f"deep: {summary.layers_checked}/{summary.layers_total} layers of {summary.images} images "
            f"decompressed ({human_bytes(summary.bytes_read)} -> "
            f"{human_bytes(summary.bytes_uncompressed)}, {summary.tar_entries} tar entries)")
