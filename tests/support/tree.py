"""Small registry trees written by hand, for tests that need no real registry.

A tree is a spec: `{path below docker/registry/v2: bytes}` for files, `None` for an empty
directory. Blobs and links are written where the registry writes them, under the digest
of their bytes, so the tree is consistent unless a test damages it on purpose. Trees the
real registry wrote come from `tests.realtools` (and the `sample_root` / `fixture_root`
fixtures); these are for the shapes a push never produces or that a unit test wants small.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

from tests.support import V2


def sha256_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def put(root: Path, rel: str, data: bytes) -> Path:
    """Write `data` at `rel` below ROOT/docker/registry/v2, creating directories."""
    path = root / V2 / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def blob_path(root: Path, digest: str) -> Path:
    algo, hexpart = digest.split(":", 1)
    return root / V2 / "blobs" / algo / hexpart[:2] / hexpart / "data"


def put_blob(root: Path, data: bytes) -> str:
    """Store `data` as a blob under its sha256; returns the digest."""
    digest = sha256_of(data)
    path = blob_path(root, digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return digest


def put_link(root: Path, rel: str, digest: str) -> None:
    """A link file (`rel` below v2) naming `digest`."""
    put(root, rel, digest.encode())


def build(root: Path, spec: Mapping[str, bytes | None], *, base_mtime_ns: int | None = None) -> Path:
    """Write `spec` below ROOT/docker/registry/v2 and return ROOT.

    `base_mtime_ns`: give every path an old, distinct mtime (1 s apart, children before
    parents) so that a test can see whether something restored or kept times."""
    v2 = root / V2
    v2.mkdir(parents=True, exist_ok=True)
    for rel, data in spec.items():
        if data is None:
            (v2 / rel).mkdir(parents=True, exist_ok=True)
        else:
            put(root, rel, data)
    if base_mtime_ns is not None:
        when = base_mtime_ns
        for dirpath, dirnames, filenames in os.walk(root, topdown=False):
            for name in dirnames + filenames:
                os.utime(Path(dirpath) / name, ns=(when, when))
                when += 1_000_000_000
    return root


def empty_root(root: Path) -> Path:
    """A registry root with empty `blobs/` and `repositories/`."""
    return build(root, {"blobs": None, "repositories": None})
