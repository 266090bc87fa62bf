"""What a removal plan (gc's, rm's) asks the sweep to remove: the words both sides share.

They live apart from `sweep` so that the judging modules that write plans (gc, rm) need
not import the module that acts on them (tests/test_layering.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Removal:
    """One path (relative to v2) to quarantine as a whole, with what the plan saw of it."""

    path: str
    phase: str
    checks: tuple[tuple[str, int], ...] = ()  # (path, mtime_ns when planned)
    grace_applies: bool = True


Revalidate = Callable[[str, Sequence[Removal]], dict[str, str]]  # phase, items -> {path: why}
