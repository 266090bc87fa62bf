"""Which blobs a verify run re-hashes, judged from the verification record (no I/O here).

* `--changed-only`: a blob is due when the record has no good verdict for it, when its stat
  (size, mtime, ctime, inode) differs from the one recorded, or when its verdict is older
  than `--max-age`. Everything else is skipped.
* `--sample P`: additionally (or, alone, only) the stalest blobs (never verified first, then
  oldest `verified_at`, then by digest) until P% of the store's bytes. Every hashed blob gets
  a fresh verdict and goes to the back of the queue, so repeated runs rotate through the
  whole store: after 100/P completed runs every blob has been re-read. This rotating pass
  is what catches bit rot, which changes bytes without changing any stat.
* Without either, every blob is due.

The order returned is the order to hash in: new and changed blobs first, then the stalest,
so that a run cut short by `--max-duration` is resumed by the next one (what it finished
is fresh and goes last). Blobs of equal priority go in inode order, which reads a disk front
to back.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING

from regfsck.inventory import Blob

if TYPE_CHECKING:
    from regfsck.record import RecordEntry

DEFAULT_MAX_AGE = timedelta(days=30)
NEVER = float("-inf")


class Reason(enum.StrEnum):
    """Why a blob is re-hashed this run."""

    ALL = "all"  # no --changed-only / --sample: everything
    NEW = "new"  # no good verdict on record
    CHANGED = "changed"  # stat differs from the recorded one
    EXPIRED = "expired"  # verdict older than --max-age
    SAMPLED = "sampled"  # part of the rotating --sample slice


_PRIORITY = {Reason.NEW: 0, Reason.CHANGED: 0, Reason.ALL: 1, Reason.EXPIRED: 1, Reason.SAMPLED: 2}


@dataclass(frozen=True)
class SelectionOptions:
    changed_only: bool = False
    max_age: timedelta = DEFAULT_MAX_AGE
    sample_percent: float | None = None  # 0 < P <= 100


@dataclass
class Selection:
    """The blobs to hash, in order, and what was left out because the record vouches for it."""

    to_hash: list[Blob] = field(default_factory=list)
    reasons: dict[str, Reason] = field(default_factory=dict)  # digest -> reason
    skipped: int = 0
    skipped_bytes: int = 0

    def counts(self) -> dict[str, int]:
        return dict(Counter(str(r) for r in self.reasons.values()))

    def to_json(self) -> dict[str, object]:
        return {"to_hash": len(self.to_hash), "bytes_to_hash": sum(b.size for b in self.to_hash),
                "reasons": self.counts(), "skipped": self.skipped,
                "skipped_bytes": self.skipped_bytes}


def _due(blob: Blob, entry: RecordEntry | None, now: float, max_age: timedelta) -> Reason | None:
    if entry is None:
        return Reason.NEW
    if not entry.same_stat(blob):
        return Reason.CHANGED
    if now - entry.verified_at > max_age.total_seconds():
        return Reason.EXPIRED
    return None


def select_blobs(blobs: Sequence[Blob], record: Mapping[str, RecordEntry],
                 options: SelectionOptions, now: float) -> Selection:
    """Decide which of `blobs` to re-hash (see the module docstring); `now` in epoch seconds."""
    chosen: dict[str, Reason] = {}
    rest: list[Blob] = []
    for blob in blobs:
        if options.changed_only:
            reason = _due(blob, record.get(blob.digest), now, options.max_age)
            if reason is not None:
                chosen[blob.digest] = reason
                continue
        elif options.sample_percent is None:
            chosen[blob.digest] = Reason.ALL
            continue
        rest.append(blob)
    if options.sample_percent is not None and rest:
        budget = options.sample_percent / 100 * sum(b.size for b in blobs)
        taken = 0
        for blob in sorted(rest, key=lambda b: (_verified_at(record, b), b.digest)):
            if taken >= budget and taken > 0:
                break
            chosen[blob.digest] = Reason.SAMPLED
            taken += blob.size or 1
    selection = Selection(reasons=chosen)
    for blob in blobs:
        if blob.digest in chosen:
            selection.to_hash.append(blob)
        else:
            selection.skipped += 1
            selection.skipped_bytes += blob.size
    selection.to_hash.sort(key=lambda b: (_PRIORITY[chosen[b.digest]], _verified_at(record, b),
                                          b.inode))
    return selection


def _verified_at(record: Mapping[str, RecordEntry], blob: Blob) -> float:
    entry = record.get(blob.digest)
    return NEVER if entry is None or not entry.same_stat(blob) else entry.verified_at
