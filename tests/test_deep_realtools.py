"""`verify --deep` on images pushed through the real registry, each with one crafted defect.

The registry checks only that each blob hashes to its digest, so it accepts every one of
these images; plain verify finds nothing wrong with them (correctly: every blob is intact),
and only --deep sees that the layers are not what the configs promise.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
import textwrap
import threading
import zlib
from pathlib import Path

import pytest

from regfsck.deep import run_deep
from regfsck.findings import Severity
from regfsck.root import locate
from regfsck.verify import VerifyOptions, run_verify
from tests.realtools import (
    SampleInfo,
)
from tests.support import REPO_ROOT
from tests.support.cli import run
from tests.support.deep_images import Crafted

pytestmark = pytest.mark.realtools
DEEP_KINDS = {"layer_diff_id_mismatch", "layer_not_tar", "layer_decompress_error",
              "layer_compression_mismatch", "config_diff_ids_invalid"}


def deep_keys(findings: list) -> set[tuple[str, str, str]]:  # type: ignore[type-arg]
    return {(f.kind, f.repo, f.digest) for f in findings if f.kind in DEEP_KINDS}


def test_plain_verify_sees_nothing_deep_sees_each_defect(crafted: Crafted) -> None:
    plain = run_verify(locate(crafted.root), VerifyOptions(jobs=2))
    assert [f for f in plain.findings if f.severity is Severity.ERROR] == []
    deep = run_deep(locate(crafted.root), jobs=2)
    assert deep_keys(deep.findings) == crafted.expected
    assert {f.kind for f in deep.findings} <= DEEP_KINDS
    assert deep.summary.layers_checked == deep.summary.layers_total
    assert deep.summary.bytes_read == deep.summary.bytes_total
    mismatch = next(f for f in deep.findings if f.kind == "layer_diff_id_mismatch")
    assert mismatch.affected_tags == (f"{mismatch.repo}:latest",) and "layer 1 " in mismatch.message
    assert mismatch.severity is Severity.ERROR


def test_same_findings_with_one_or_many_threads(crafted: Crafted) -> None:
    one = run_deep(locate(crafted.root), jobs=1)
    many = run_deep(locate(crafted.root), jobs=4)
    assert [f.to_json() for f in one.findings] == [f.to_json() for f in many.findings]


def test_cli_verify_deep(crafted: Crafted) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return run("verify", str(crafted.root), *args)

    plain = cli("--json")
    assert plain.returncode == 0, plain.stderr
    assert "deep" not in json.loads(plain.stdout)
    deep = cli("--deep", "--json")
    assert deep.returncode == 1
    doc = json.loads(deep.stdout)
    assert {(f["kind"], f["repo"], f["digest"]) for f in doc["findings"]
            if f["kind"] in DEEP_KINDS} == crafted.expected
    assert doc["summary"]["errors"] == sum(f["severity"] == "error" for f in doc["findings"])
    assert doc["deep"]["layers_checked"] == doc["deep"]["layers_total"] > 0
    scoped = cli("--deep", "--repo", "deep/good")
    assert scoped.returncode == 0, scoped.stdout
    assert "deep: 3/3 layers of 1 image decompressed" in scoped.stdout.replace("\n", " ")


def test_interrupt_stops_cleanly(crafted: Crafted) -> None:
    stop = threading.Event()

    class StopAtFirstByte:
        def start(self, total_bytes: int, total_layers: int) -> None: ...

        def advance(self, nbytes: int) -> None:
            stop.set()

        def finish(self) -> None: ...

    report = run_deep(locate(crafted.root), jobs=1, stop=stop, progress=StopAtFirstByte())
    assert report.summary.interrupted
    assert report.summary.layers_checked < report.summary.layers_total


def test_real_sample_is_clean(real_sample: tuple[Path, SampleInfo]) -> None:
    """skopeo-pushed gzip and zstd layers, schema1, docker and OCI images: nothing to report."""
    report = run_deep(locate(real_sample[0]), jobs=2)
    assert report.findings == []
    assert report.summary.layers_checked == report.summary.layers_total >= 9


def test_memory_stays_bounded_on_a_huge_layer(tmp_path: Path) -> None:
    """A 1 GiB layer that gzips to ~1 MiB (a decompression bomb) is checked in bounded memory."""
    size = 1 << 30
    info = tarfile.TarInfo("zeros")
    info.size = size
    header = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    tail = bytes(-size % 512 + 1024)
    sha = hashlib.sha256(header)
    compressor = zlib.compressobj(1, zlib.DEFLATED, 31)
    chunk = bytes(1 << 22)
    with open(tmp_path / "layer", "wb") as out:
        out.write(compressor.compress(header))
        for _ in range(size // len(chunk)):
            out.write(compressor.compress(chunk))
            sha.update(chunk)
        out.write(compressor.compress(tail) + compressor.flush())
        sha.update(tail)
    script = textwrap.dedent("""
        import json, resource, sys
        from pathlib import Path
        from regfsck.deep import LayerJob, check_layer
        from regfsck.storage import FilesystemStorage
        path = Path(sys.argv[1]) / "layer"
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        outcome = check_layer(FilesystemStorage(path.parent),
                              LayerJob("sha256:" + "0" * 64, "layer", path.stat().st_size))
        print(json.dumps({"diff_id": outcome.diff_id, "tar_error": outcome.tar_error,
                          "entries": outcome.tar_entries, "uncompressed": outcome.uncompressed_bytes,
                          "before_kib": before,
                          "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
    """)
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True,
                            text=True, timeout=600, cwd=REPO_ROOT,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["diff_id"] == "sha256:" + sha.hexdigest(), doc
    assert doc["tar_error"] is None and doc["entries"] == 1
    assert doc["uncompressed"] == len(header) + size + len(tail)
    assert doc["peak_kib"] - doc["before_kib"] < 64 * 1024, doc  # 1 GiB went through, a few MiB held
