"""`verify --deep`: the layer pass's progress bar and its line of the report (run_verify runs it)."""

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

from regfsck.cli.common import human_bytes, stderr_console, stdout_console
from regfsck.deep import DeepProgress, DeepSummary


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


def deep_json(summary: DeepSummary | None) -> dict[str, Any]:
    """The `deep` member of verify's JSON (absent without --deep)."""
    return {"deep": summary.to_json()} if summary is not None else {}


def render_deep(summary: DeepSummary | None) -> None:
    if summary is not None:
        stdout_console().print(
            f"deep: {summary.layers_checked}/{summary.layers_total} layers of {summary.images} images "
            f"decompressed ({human_bytes(summary.bytes_read)} -> "
            f"{human_bytes(summary.bytes_uncompressed)}, {summary.tar_entries} tar entries)")
