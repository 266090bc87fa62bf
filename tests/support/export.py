"""Exports made with the engine (no CLI) and what is inside an OCI layout or archive."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path
from typing import Any

import zstandard


def export(root: Path, refs: list[str], output: Path, **kw: Any) -> Any:
    """`regfsck export` through the engine: scan `root`, export `refs` to `output`."""
    from regfsck.export import export_images
    from regfsck.refs import parse_ref
    from regfsck.root import locate
    from regfsck.scanner import Scanner
    from regfsck.storage import FilesystemStorage

    registry = locate(root)
    storage = FilesystemStorage(registry.v2)
    inventory = Scanner(storage, registry).scan()
    parsed = [parse_ref(r, bare="repository") for r in refs]
    return export_images(storage, inventory, parsed, output, registry.v2, **kw)


def read_archive(path: Path) -> dict[str, bytes]:
    """Every regular file of a (possibly compressed) tar, by name."""
    raw = path.read_bytes()
    if raw[:4] == b"\x28\xb5\x2f\xfd":
        raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw)).read()
    elif raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    files: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
        for member in tar:
            if member.isfile():
                extracted = tar.extractfile(member)
                assert extracted is not None
                files[member.name] = extracted.read()
    return files


def read_layout_dir(path: Path) -> dict[str, bytes]:
    """Every file of an OCI layout directory, by its path inside the layout."""
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()}
