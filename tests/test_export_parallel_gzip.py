"""`export` to .tar.gz writes parallel gzip members: every reader must see one gzip stream.

Oracles: Python's gzip module (the decompressed bytes equal the plain `.tar` export byte
for byte), skopeo (reads the oci-archive images out of the .tar.gz; the docker-archive after
GNU gzip unpacked it) and
the real registry serving what `regfsck import` took back in from it. The exports use a
tiny block so that even the small sample becomes dozens of members.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import zlib
from pathlib import Path

import pytest

from regfsck import deflate
from regfsck.export import ExportFormat
from regfsck.importer import run_import
from tests.realtools import RealRegistry, SampleInfo, sha256_digest, skopeo
from tests.support.export import export

OCI_REFS = ["library/base:latest", "multi/oci:latest", "compress/zstd:latest", "a/b:latest"]


def members(data: bytes) -> int:
    """How many gzip members `data` holds (each one checked by zlib)."""
    count = 0
    while data:
        member = zlib.decompressobj(31)
        member.decompress(data)
        assert member.eof, "truncated member"
        data = member.unused_data
        count += 1
    return count


@pytest.fixture(params=["isal", "zlib"])
def deflater(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "isal":
        lib = pytest.importorskip("isal.isal_zlib", reason="python-isal is not installed")
        monkeypatch.setattr(deflate, "_LIB", lib)
    else:
        monkeypatch.setattr(deflate, "_LIB", None)
    return str(request.param)


class _Sink:
    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> int:
        self.data += data
        return len(data)


@pytest.mark.parametrize("sizes", [[], [0], [1], [5000, 1, 70000], [200_000], [65536] * 7])
def test_writer_round_trips_in_order(deflater: str, sizes: list[int],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(deflate.ParallelGzipWriter, "BLOCK", 65536)
    chunks = [os.urandom(n // 2) + b"x" * (n - n // 2) for n in sizes]
    out = _Sink()
    writer = deflate.ParallelGzipWriter(out, threads=3)
    for chunk in chunks:
        writer.write(chunk)
    writer.close()
    assert gzip.decompress(bytes(out.data)) == b"".join(chunks)
    assert members(bytes(out.data)) == max(1, -(-sum(sizes) // 65536))


@pytest.mark.realtools
def test_parallel_gzip_export_is_read_by_gzip_skopeo_and_import(
        real_sample: tuple[Path, SampleInfo], tmp_path: Path, deflater: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    root, info = real_sample
    plain, packed = tmp_path / "images.tar", tmp_path / "images.tar.gz"
    export(root, OCI_REFS, plain)
    monkeypatch.setattr(deflate.ParallelGzipWriter, "BLOCK", 4 << 10)
    export(root, OCI_REFS, packed)
    data = packed.read_bytes()
    assert members(data) > 20
    assert gzip.decompress(data) == plain.read_bytes()  # the same tar, byte for byte
    for ref in OCI_REFS:
        repo, tag = ref.split(":")
        raw = skopeo("inspect", "--raw", f"oci-archive:{packed}:{ref}").encode()
        assert sha256_digest(raw) == info.tags[repo][tag]
    docker = tmp_path / "docker.tar.gz"
    export(root, ["library/base:latest"], docker, fmt=ExportFormat.DOCKER_ARCHIVE)
    assert members(docker.read_bytes()) > 1
    # skopeo 1.9 reads no gzip'd docker-archive at all (a single member from Python's gzip
    # fails the same way), only .tar and .tar.zst: GNU gzip unpacks it for skopeo to read.
    unpacked = tmp_path / "docker.tar"
    with open(unpacked, "wb") as out:
        subprocess.run(["gzip", "-dc", str(docker)], stdout=out, check=True)
    inspected = json.loads(skopeo("inspect", f"docker-archive:{unpacked}:library/base:latest"))
    manifest = json.loads(_tree_blob(root, info.tags["library/base"]["latest"]))
    config = json.loads(_tree_blob(root, manifest["config"]["digest"]))
    assert inspected["Layers"] == config["rootfs"]["diff_ids"]  # every layer decompressed right
    imported = tmp_path / "imported"
    imported.mkdir()
    run_import(imported, packed, apply=True)
    with RealRegistry(imported) as registry:
        for ref in OCI_REFS:
            repo, tag = ref.split(":")
            assert registry.manifest_digest(repo, tag) == info.tags[repo][tag]


def _tree_blob(root: Path, digest: str) -> bytes:
    hex_part = digest.split(":")[1]
    return (root / "docker/registry/v2/blobs/sha256" / hex_part[:2] / hex_part / "data").read_bytes()
