"""`verify --deep`: the layer pass's progress bar and its line of the report (run_verify runs it)."""

from __future__ import annotations

from typing import Any

from regfsck.cli.common import ByteBar, human_bytes, plural, say
from regfsck.deep import DeepProgress, DeepSummary


class RichDeepProgress(ByteBar, DeepProgress):
    """Compressed layer bytes read / rate / ETA on stderr (IEC units, like the summary)."""

    def __init__(self) -> None:
        super().__init__("checking layers")


def deep_json(summary: DeepSummary | None) -> dict[str, Any]:
    """The `deep` member of verify's JSON (absent without --deep)."""
    return {"deep": summary.to_json()} if summary is not None else {}


def render_deep(summary: DeepSummary | None) -> None:
    if summary is not None:
        say(f"deep: {summary.layers_checked}/{plural(summary.layers_total, 'layer')} of "
            f"{plural(summary.images, 'image')} decompressed ({human_bytes(summary.bytes_read)} "
            f"-> {human_bytes(summary.bytes_uncompressed)}, "
            f"{plural(summary.tar_entries, 'tar entry', 'tar entries')})")
