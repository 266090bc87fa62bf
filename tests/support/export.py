"""Exports made with the engine (no CLI) and what is inside an OCI layout or archive."""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Any


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
    """Every regular file of a (possibly compressed) tar, by name; the compressed stream
    must be whole (regfsck.compression: the reader import and `repair --from` use)."""
    from regfsck.compression import DecompressedReader

    files: dict[str, bytes] = {}
    with path.open("rb") as raw:
        reader = DecompressedReader(raw)
        with tarfile.open(fileobj=reader.stream, mode="r|") as tar:
            for member in tar:
                if member.isfile():
                    extracted = tar.extractfile(member)
                    assert extracted is not None
                    files[member.name] = extracted.read()
        assert reader.damage() is None, f"{path}: {reader.damage()}"
    return files


def read_layout_dir(path: Path) -> dict[str, bytes]:
    """Every file of an OCI layout directory, by its path inside the layout."""
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()}
