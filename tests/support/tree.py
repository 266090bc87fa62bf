"""Small registry trees written by hand, for tests that need no real registry.

A tree is a spec: `{path below docker/registry/v2: bytes}` for files, `None` for an empty
directory. Blobs and links are written where the registry writes them, under the digest
of their bytes, so the tree is consistent unless a test damages it on purpose. Trees the
real registry wrote come from `tests.realtools` (and the `sample_root` / `fixture_root`
fixtures); these are for the shapes a push never produces or that a unit test wants small.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from regfsck import layout
from tests.support import V2

OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def copy_tree(src: Path, dest: Path) -> Path:
    """Copy a registry root keeping mtimes and symlinks as they are."""
    shutil.copytree(src, dest, symlinks=True, copy_function=shutil.copy2)
    return dest


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


def add_manifest(root: Path, repo: str, body: bytes, tag: str | None = None) -> str:
    """Store `body` under its true digest with a revision link (and a tag), as a push would."""
    digest = sha256_of(body)
    put(root, layout.blob_data(digest), body)
    put(root, layout.revision_link(repo, digest), digest.encode())
    if tag is not None:
        put(root, layout.tag_current_link(repo, tag), digest.encode())
        put(root, layout.tag_index_link(repo, tag, digest), digest.encode())
    return digest


def nested_indexes(root: Path, repo: str, leaf: str, levels: int, width: int = 1,
                   tag: str = "nested") -> str:
    """`levels` indexes stacked on `leaf`, each listing the one below `width` times."""
    child, size = leaf, (root / V2 / layout.blob_data(leaf)).stat().st_size
    media_type = "application/vnd.oci.image.manifest.v1+json"
    for level in range(levels):
        body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
            {"mediaType": media_type, "digest": child, "size": size,
             "platform": {"os": "linux", "architecture": f"l{level}w{i}"}} for i in range(width)
        ]}).encode()
        child = add_manifest(root, repo, body, tag if level == levels - 1 else None)
        size, media_type = len(body), OCI_INDEX
    return child
