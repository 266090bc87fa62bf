"""How a result record becomes its JSON document: one answer for every `--json` output.

The plans, results and summaries the commands print under --json are dataclasses whose
document is their fields as they are (`Document`), or without the fields that are None
(`SparseDocument`: what the record could not tell is left out, not printed as null).
A record whose document differs (nested records, renamed keys) writes its own `to_json`.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any


class Document:
    """A dataclass whose JSON document is its fields, as they are. (No slots of its own,
    so that a record kept by the 10,000s, a plan's victims, can be a slotted dataclass.)"""

    __slots__ = ()

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]


class SparseDocument:
    """A dataclass whose JSON document is its fields that are not None."""

    __slots__ = ()

    def to_json(self) -> dict[str, Any]:
        return {f.name: value for f in fields(self)  # type: ignore[arg-type]
                if (value := getattr(self, f.name)) is not None}
