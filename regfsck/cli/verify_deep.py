"""`verify --deep`: the layer pass's progress bar and its line of the report (run_verify runs it)."""

from __future__ import annotations

import threading
from typing import Any

from rich.progress import Progress, TextColumn

from regfsck.cli.common import byte_columns, human_bytes, plural, say, stderr_console
from regfsck.deep import DeepProgress, DeepSummary


class RichDeepProgress(DeepProgress):
    """Compressed layer bytes read / rate / ETA on stderr (IEC units, like the summary)."""

    def __init__(self) -> None:
        self.progress = Progress(TextColumn("checking layers"), *byte_columns(),
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
        say(f"deep: {summary.layers_checked}/{plural(summary.layers_total, 'layer')} of "
            f"{plural(summary.images, 'image')} decompressed ({human_bytes(summary.bytes_read)} "
            f"-> {human_bytes(summary.bytes_uncompressed)}, "
            f"{plural(summary.tar_entries, 'tar entry', 'tar entries')})")
