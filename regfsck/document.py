"""How a result record becomes its JSON document: one answer for every `--json` output.

The plans, results and summaries the commands print under --json are dataclasses whose
document is their fields as they are (`Document`), or without the fields that are None
(`SparseDocument`: what the record could not tell is left out, not printed as null).
A record whose document differs (nested records, renamed keys) writes its own `to_json`.
"""

from __future__ import annotations

from typing import Any


class Document:
    """A dataclass whose JSON document is its fields, as they are."""

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


class SparseDocument:
    """A dataclass whose JSON document is its fields that are not None."""

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}
