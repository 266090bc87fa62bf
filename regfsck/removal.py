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
    # (name below `path`, "" for `path` itself; its mtime_ns when planned). Names, not
    # paths: at 1M files a plan has 50,000 victims, and a path each was 7 MB (issue 15).
    checks: tuple[tuple[str, int], ...] = ()
    grace_applies: bool = True

    def checked(self) -> list[tuple[str, int]]:
        """The checks with their paths (relative to v2)."""
        return [(f"{self.path}/{name}" if name else self.path, seen_ns)
                for name, seen_ns in self.checks]


Revalidate = Callable[[str, Sequence[Removal]], dict[str, str]]  # phase, items -> {path: why}
