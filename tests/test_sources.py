"""regfsck.sources: one reader of OCI layouts and archives for import and `repair --from`.

Small layouts written in Python (tests/realtools.OCILayoutWriter), archived plain, gzip'd
and zstd'd; then damaged and made hostile: every bad input is one SourceError with a
reason, never a traceback, and no byte that does not hash to its name is handed out.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import random
import tarfile
from pathlib import Path

import pytest
import zstandard

from regfsck.root import RegistryRoot
from regfsck.sources import (
    ArchiveSource,
    DirectorySource,
    SourceError,
    oci_blob_digest,
    open_blob_source,
    open_layout,
)
from tests.realtools import OCILayoutWriter
from tests.support.cli import invoke

COMPRESSIONS = ["plain", "gzip", "zstd"]


def small_layout(path: Path) -> tuple[OCILayoutWriter, dict[str, bytes]]:
    """A one-image layout; returns it and every blob by digest."""
    writer = OCILayoutWriter(path)
    layer = writer.add_layer({"a.txt": b"hello " * 3000, "noise": random.randbytes(200_000)},
                             "gzip")
    writer.add_image([layer], tag="team/app:v1")
    blobs = {f"sha256:{p.name}": p.read_bytes() for p in (path / "blobs" / "sha256").iterdir()}
    return writer, blobs


def tar_of(members: list[tuple[str, bytes | None]]) -> bytes:
    """A tar of (name, data) members; data None makes a symlink to /etc/passwd."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def layout_members(path: Path) -> list[tuple[str, bytes | None]]:
    return [(p.relative_to(path).as_posix(), p.read_bytes())
            for p in sorted(path.rglob("*")) if p.is_file()]


def compress(raw: bytes, how: str) -> bytes:
    if how == "gzip":
        return gzip.compress(raw)
    if how == "zstd":
        return zstandard.ZstdCompressor().compress(raw)
    return raw


@pytest.fixture
def layout(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    writer, blobs = small_layout(tmp_path / "layout")
    return writer.path, blobs


def archive(tmp_path: Path, members: list[tuple[str, bytes | None]], how: str = "plain",
            name: str = "a.tar") -> Path:
    path = tmp_path / name
    path.write_bytes(compress(tar_of(members), how))
    return path


def test_oci_blob_names() -> None:
    digest = "sha256:" + "a" * 64
    assert oci_blob_digest(f"./blobs/sha256/{'a' * 64}") == digest
    for name in (f"blobs/sha256/{'A' * 64}", "blobs/sha256/../../x", "index.json",
                 f"x/blobs/sha256/{'a' * 64}", f"blobs/md5/{'a' * 32}"):
        assert oci_blob_digest(name) is None


@pytest.mark.parametrize("how", COMPRESSIONS)
def test_archive_and_directory_hand_out_the_same_verified_blobs(
        layout: tuple[Path, dict[str, bytes]], tmp_path: Path, how: str) -> None:
    path, blobs = layout
    packed = archive(tmp_path, layout_members(path), how)
    for source in (open_layout(path), open_layout(packed), open_blob_source(packed)):
        assert json.loads(source.index_bytes())["manifests"]
        assert source.verify(blobs) == set(blobs) and not source.corrupt
        assert {d: source.size(d) for d in blobs} == {d: len(b) for d, b in blobs.items()}
        got = {d: b"".join(chunks) for d, _, chunks in source.stream(set(blobs))}
        assert got == blobs
        manifest = next(d for d, b in blobs.items() if b'"schemaVersion"' in b)
        assert source.read_manifest(manifest) == blobs[manifest]


def test_repair_spools_archive_blobs_and_cleans_up(layout: tuple[Path, dict[str, bytes]],
                                                    tmp_path: Path) -> None:
    path, blobs = layout
    source = open_blob_source(archive(tmp_path, layout_members(path), "zstd"))
    root = tmp_path / "root"
    root.mkdir()
    source.prepare(set(blobs), RegistryRoot(root, root / "docker/registry/v2"))
    for digest, data in blobs.items():
        with source.open(digest) as stream:
            assert stream.read() == data
    source.close()
    assert list((root / "regfsck-state").iterdir()) == []


def test_a_docker_archive_serves_blobs_but_is_no_layout_to_import(
        layout: tuple[Path, dict[str, bytes]], tmp_path: Path) -> None:
    path, blobs = layout
    members = [(n, d) for n, d in layout_members(path) if n.startswith("blobs/")]
    docker = archive(tmp_path, [*members, ("manifest.json", b"[]")])
    with pytest.raises(SourceError, match=r"not an OCI archive \(no index\.json"):
        open_layout(docker).index_bytes()
    assert open_blob_source(docker).verify(blobs) == set(blobs)


def test_a_corrupt_member_is_never_handed_out(layout: tuple[Path, dict[str, bytes]],
                                              tmp_path: Path) -> None:
    path, blobs = layout
    layer = max(blobs, key=lambda d: len(blobs[d]))
    members = [(n, (d[:-1] + b"X") if d is not None and n.endswith(layer[7:]) else d)
               for n, d in layout_members(path)]
    for source in (open_layout(archive(tmp_path, members, "gzip")),):
        assert layer not in source.verify(blobs) and "is corrupt" in source.corrupt[layer]
        with pytest.raises(SourceError, match="is corrupt"):
            for _, _, chunks in source.stream({layer}):
                b"".join(chunks)
    (path / "blobs" / "sha256" / layer[7:]).write_bytes(b"X" + blobs[layer][1:])
    directory = open_layout(path)
    assert isinstance(directory, DirectorySource)
    assert directory.verify(blobs) == set(blobs) - {layer} and "is corrupt" in directory.corrupt[layer]


def zstd_cut_between_frames(raw: bytes, cut: int) -> bytes:
    """Two zstd frames (split at `cut`), the second one truncated."""
    first = zstandard.ZstdCompressor().compress(raw[:cut])
    second = zstandard.ZstdCompressor().compress(raw[cut:])
    return first + second[:len(second) // 2]


@pytest.mark.parametrize("damage", ["gzip cut", "zstd cut", "zstd cut between frames",
                                    "plain cut", "bzip2", "garbage", "empty"])
def test_damaged_archives_are_one_error(layout: tuple[Path, dict[str, bytes]], tmp_path: Path,
                                        damage: str) -> None:
    path, _ = layout
    raw = tar_of(layout_members(path))
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        boundary = tar.getmembers()[-1].offset  # a member boundary: the last header
    data = {
        "gzip cut": gzip.compress(raw)[:len(gzip.compress(raw)) // 2],
        "zstd cut": zstandard.ZstdCompressor().compress(raw)[:-20],
        "zstd cut between frames": zstd_cut_between_frames(raw, boundary),
        "plain cut": raw[:boundary + 700],
        "bzip2": bz2.compress(raw),
        "garbage": b"not a tar at all" * 100,
        "empty": b"",
    }[damage]
    bad = tmp_path / "bad.tar"
    bad.write_bytes(data)
    for open_source in (open_layout, open_blob_source):
        with pytest.raises(SourceError) as caught:
            open_source(bad).index_bytes()
        assert "\n" not in str(caught.value)
    if damage == "zstd cut between frames":  # the decoder alone would see a complete tar
        with pytest.raises(SourceError, match="zstd stream is truncated"):
            ArchiveSource(bad)
    for args, codes in ((("import", str(tmp_path / "root"), str(bad)), (1, 2)),
                        (("repair", str(tmp_path / "root"), "--from", str(bad)), (2,))):
        (tmp_path / "root" / "docker/registry/v2").mkdir(parents=True, exist_ok=True)
        result = invoke(*args)
        assert result.returncode in codes, (args, result.stderr)
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_hostile_members(layout: tuple[Path, dict[str, bytes]], tmp_path: Path) -> None:
    """A blob name that is a symlink, names that climb out, two index.json: nothing is
    followed or written; the symlinked blob counts as corrupt, two index.json stop import."""
    path, blobs = layout
    members = layout_members(path)
    victim = sorted(blobs)[0]
    hostile = [(n, None if n.endswith(victim[7:]) else d) for n, d in members]
    hostile += [("../../escape", b"x"), ("/abs/path", b"y"), (f"blobs/sha256/{'0' * 63}", b"z")]
    source = open_layout(archive(tmp_path, hostile))
    assert victim in source.corrupt and "not a regular file" in source.corrupt[victim]
    assert source.verify(blobs) == set(blobs) - {victim}
    two = open_layout(archive(tmp_path, [*members, ("./index.json", b"{}")], name="two.tar"))
    with pytest.raises(SourceError, match=r"two index\.json"):
        two.index_bytes()
    assert not (tmp_path.parent / "escape").exists() and not Path("/abs/path").exists()


def test_an_archive_that_changes_after_it_was_opened(layout: tuple[Path, dict[str, bytes]],
                                                     tmp_path: Path) -> None:
    """Import copies (and repair spools) in a second pass: an archive cut in between is a
    SourceError from the chunks, never a half-written blob taken as good."""
    path, blobs = layout
    packed = archive(tmp_path, layout_members(path))
    source = open_layout(packed)
    layer = max(blobs, key=lambda d: len(blobs[d]))
    with tarfile.open(packed) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(layer[7:]))
    packed.write_bytes(packed.read_bytes()[: member.offset_data + member.size // 2])
    with pytest.raises(SourceError, match=r"cannot read the archive"):
        for _, _, chunks in source.stream({layer}):
            b"".join(chunks)
    spooling = open_blob_source(archive(tmp_path, layout_members(path), "zstd", name="b.tar"))
    (tmp_path / "b.tar").write_bytes(b"")
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(SourceError):
        spooling.prepare(set(blobs), RegistryRoot(root, root / "docker/registry/v2"))
