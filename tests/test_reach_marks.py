"""gc's mark keeps what it reached compactly (`reach.KeptDigests`, memory): it must answer
"is this digest kept?" as the set of every reached digest did, and err only on the safe
side (kept) for a blob stored after the mark."""

from __future__ import annotations

import hashlib

from regfsck.inventory import Blob, BlobTable
from regfsck.reach import _Marker


def _digest(name: str) -> str:
    return "sha256:" + hashlib.sha256(name.encode()).hexdigest()


def test_kept_digests_answer_as_the_set_of_reached_digests() -> None:
    reached, unreached, misplaced, missing, later = (_digest(n) for n in "abcde")
    table = BlobTable()
    for digest in (reached, unreached):
        table.add(digest, 1, 0, 0, 0)
    table[misplaced] = Blob(misplaced, "blobs/sha256/zz/elsewhere/data", 1, 0)  # an object
    marker = _Marker(table)
    marker.add([reached, misplaced, missing, reached])
    kept = marker.kept()
    assert {d: d in kept for d in (reached, unreached, misplaced, missing, later)} == {
        reached: True, unreached: False, misplaced: True, missing: True, later: False}
    assert sorted(kept) == sorted([reached, misplaced, missing]) and len(kept) == 3
    table.add(later, 1, 0, 0, 0)  # stored after the mark: kept (never swept unjudged)
    assert later in kept and unreached not in kept


def test_marking_every_stored_blob_keeps_them_all() -> None:
    table = BlobTable()
    digests = [_digest(str(i)) for i in range(50)]
    for digest in digests:
        table.add(digest, 1, 0, 0, 0)
    marker = _Marker(table)
    marker.add(table)
    kept = marker.kept()
    assert all(d in kept for d in digests) and len(kept) == 50
