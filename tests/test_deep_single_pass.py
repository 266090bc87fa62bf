"""`verify --deep` reads each layer once: the deep pass hashes the compressed bytes it
decompresses, and that digest is the layer's plain verdict.

Oracle: the two-pass run it replaces (plain `run_verify`, then `run_deep`, findings merged),
on a tree pushed through the real registry and then damaged on disk. Both must give the
same findings, messages and counts; the single pass must open an intact layer once.
The gzip reader behind it is compared with Python's gzip module, with ISA-L and with zlib.
"""

from __future__ import annotations

import collections
import gzip
import os
import shutil
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from regfsck import deflate, layout
from regfsck.checks import FindingSet
from regfsck.deep import BUFFER, run_deep
from regfsck.graph import ManifestStore
from regfsck.root import locate
from regfsck.scanner import Scanner
from regfsck.storage import FilesystemStorage
from regfsck.verify import VerifyOptions, VerifyReport, run_verify, with_affected_tags
from tests.support import V2
from tests.support.deep_images import Crafted


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x55
    os.chmod(path, 0o644)
    path.write_bytes(bytes(data))


@pytest.fixture
def damaged(crafted: Crafted, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """The crafted tree with the clean image's three layers damaged on disk (gzip: a byte
    of deflate data; plain tar: a byte of file content; zstd: the last frame cut)."""
    root = tmp_path / "root"
    shutil.copytree(crafted.root, root, symlinks=True)
    report = run_deep(locate(root), jobs=1)
    assert not [f for f in report.findings if f.repo == "deep/good"]
    inv_layers = _layers_of(root, "deep/good")
    damage: dict[str, str] = {}
    for digest in inv_layers:
        path = root / V2 / layout.blob_data(digest)
        head = path.read_bytes()[:4]
        if head.startswith(b"\x1f\x8b"):
            _flip(path, path.stat().st_size // 2)
            damage[digest] = "gzip"
        elif head.startswith(b"\x28\xb5\x2f\xfd"):
            os.truncate(path, path.stat().st_size - 20)
            damage[digest] = "zstd"
        else:
            _flip(path, 600)  # inside the first member's data
            damage[digest] = "tar"
    assert sorted(damage.values()) == ["gzip", "tar", "zstd"]
    return root, damage


def _layers_of(root: Path, repo: str) -> list[str]:
    base = root / V2 / "repositories" / repo / "_layers" / "sha256"
    return [f"sha256:{d.name}" for d in base.iterdir()
            if (d / "link").read_text() and not _is_config(root, f"sha256:{d.name}")]


def _is_config(root: Path, digest: str) -> bool:
    return (root / V2 / layout.blob_data(digest)).read_bytes()[:1] == b"{"


def _two_pass(root: Path) -> tuple[list[dict[str, object]], VerifyReport]:
    plain = run_verify(locate(root), VerifyOptions(jobs=2))
    deep = run_deep(locate(root), jobs=2)
    merged = FindingSet()
    merged.extend(plain.findings)
    merged.extend(deep.findings)
    # verify names every repo:tag that needs a damaged blob (deep's own report, per image,
    # names the image's tags only)
    registry = locate(root)
    storage = FilesystemStorage(registry.v2)
    inventory = Scanner(storage, registry).scan()
    found = with_affected_tags(merged.findings(), inventory, ManifestStore(storage, inventory))
    return _canonical(found), plain


def _canonical(findings: list) -> list[dict[str, object]]:  # type: ignore[type-arg]
    return sorted((f.to_json() for f in findings), key=repr)


@pytest.fixture
def count_opens(monkeypatch: pytest.MonkeyPatch) -> Iterator[collections.Counter[str]]:
    monkeypatch.setenv("REGFSCK_DEEP_PROCESSES", "0")  # layers read in this process: counted
    opened: collections.Counter[str] = collections.Counter()
    for name in ("open_fd", "open_fd_fast"):
        original = getattr(FilesystemStorage, name)

        def counting(self: FilesystemStorage, path: str, _orig=original) -> int:  # type: ignore[no-untyped-def]
            opened[path] += 1
            return _orig(self, path)  # type: ignore[no-any-return]

        monkeypatch.setattr(FilesystemStorage, name, counting)
    yield opened


@pytest.mark.realtools
def test_single_pass_gives_the_two_pass_verdicts(damaged: tuple[Path, dict[str, str]],
                                                 count_opens: collections.Counter[str]) -> None:
    root, damage = damaged
    expected, plain = _two_pass(root)
    count_opens.clear()
    one = run_verify(locate(root), VerifyOptions(jobs=2, deep=True))
    assert _canonical(one.findings) == expected
    kinds = {(f.kind, f.digest) for f in one.findings}
    for digest, what in damage.items():
        assert ("blob_digest_mismatch", digest) in kinds, what  # the plain verdict
    gz = next(d for d, w in damage.items() if w == "gzip")
    assert ("layer_decompress_error", gz) in kinds  # and the deep one, as before
    zst = next(d for d, w in damage.items() if w == "zstd")
    assert ("layer_decompress_error", zst) in kinds
    tar = next(d for d, w in damage.items() if w == "tar")
    assert ("layer_diff_id_mismatch", tar) in kinds
    assert one.summary.blobs_verified == plain.summary.blobs_verified
    assert one.summary.bytes_verified == plain.summary.bytes_verified
    assert one.summary.errors == sum(f["severity"] == "error" for f in expected)
    assert one.deep is not None and one.deep.layers_checked == one.deep.layers_total
    # Every intact layer was opened once (a damaged one is re-read once, as plain verify does).
    layer_paths = {layout.blob_data(d) for repo in ("deep/not-tar", "deep/truncated-zstd")
                   for d in _layers_of(root, repo)}
    assert layer_paths and all(count_opens[p] == 1 for p in layer_paths), count_opens


@pytest.mark.realtools
def test_single_pass_on_an_intact_tree_reads_each_layer_once(
        crafted: Crafted, count_opens: collections.Counter[str]) -> None:
    expected, plain = _two_pass(crafted.root)
    count_opens.clear()
    one = run_verify(locate(crafted.root), VerifyOptions(jobs=2, deep=True))
    assert _canonical(one.findings) == expected
    assert one.summary.bytes_verified == plain.summary.bytes_verified == plain.summary.bytes_total
    assert one.deep is not None
    blob_opens = {p: n for p, n in count_opens.items() if p.startswith("blobs/")}
    assert blob_opens and set(blob_opens.values()) == {1}, blob_opens


# -- the gzip reader against Python's gzip module ------------------------------------------

_DATA = os.urandom(70_000) + b"layer " * 200_000
_ONE = gzip.compress(_DATA, mtime=0)
GZIP_CASES = {
    "one member": _ONE,
    "two members": _ONE + gzip.compress(b"second", mtime=0),
    "zero padding": _ONE + bytes(700),
    "trailing garbage": _ONE + b"garbage!",
    "one garbage byte": _ONE + b"x",
    "truncated": _ONE[:-9],
    "cut in the header": _ONE[:5],
    "bad crc": _ONE[:-8] + bytes(4) + _ONE[-4:],
    "bad length": _ONE[:-4] + b"\x01\x02\x03\x04",
    "flipped deflate byte": _ONE[:9000] + bytes([_ONE[9000] ^ 0xFF]) + _ONE[9001:],
    "empty member list": b"",
}


def _python_gzip(data: bytes) -> bytes | None:
    try:
        return gzip.decompress(data)
    except (EOFError, OSError, zlib.error):
        return None


def _ours(data: bytes) -> bytes | None:
    from regfsck.deep import _DECOMPRESS_ERRORS, gunzip
    stream = iter([data[i:i + 4096] for i in range(0, len(data), 4096)])
    try:
        chunks = list(gunzip(lambda _n: next(stream, b"")))
    except _DECOMPRESS_ERRORS:
        return None
    assert all(len(c) <= BUFFER for c in chunks)
    return b"".join(chunks)


@pytest.mark.parametrize("lib", ["isal", "zlib"])
@pytest.mark.parametrize("case", sorted(GZIP_CASES))
def test_gunzip_accepts_what_python_gzip_accepts(case: str, lib: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    if lib == "isal":
        isal_zlib = pytest.importorskip("isal.isal_zlib", reason="python-isal is not installed")
        monkeypatch.setattr(deflate, "_LIB", isal_zlib)
    else:
        monkeypatch.setattr(deflate, "_LIB", None)
    data = GZIP_CASES[case]
    assert _ours(data) == _python_gzip(data)


def test_gunzip_keeps_a_bomb_in_bounded_chunks() -> None:
    bomb = zlib.compressobj(9, zlib.DEFLATED, 31)
    data = bomb.compress(bytes(64 << 20)) + bomb.flush()
    out = _ours(data)
    assert out is not None and len(out) == 64 << 20


@pytest.mark.realtools
def test_layers_read_by_the_deep_pass_enter_the_record(crafted: Crafted,
                                                       tmp_path: Path) -> None:
    """--changed-only --deep: the layers' verdicts (taken from the deep pass) are recorded
    like every other blob's, so the next --changed-only run vouches for them."""
    from regfsck.record import VerifyRecord

    root = tmp_path / "root"
    shutil.copytree(crafted.root, root, symlinks=True)
    first = run_verify(locate(root), VerifyOptions(jobs=2, deep=True, changed_only=True))
    assert first.summary.hashed_because.get("read by --deep", 0) > 0
    record = VerifyRecord.open(locate(root), create=False)
    assert record is not None
    try:
        recorded = set(record.entries())
    finally:
        record.close()
    layers = {d for repo in ("deep/not-tar", "deep/good", "deep/truncated-zstd")
              for d in _layers_of(root, repo)}
    assert layers <= recorded
    again = run_verify(locate(root), VerifyOptions(jobs=2, changed_only=True))
    assert again.summary.blobs_skipped == again.summary.blobs_total


@pytest.mark.realtools
def test_worker_processes_stop_and_agree_with_threads(crafted: Crafted,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Layers go to forked worker processes when jobs > 1: the same findings as threads,
    and a stop set mid-run ends it early with a partial summary."""
    import threading

    from regfsck.deep import check_layers, plan_deep
    from regfsck.graph import ManifestStore
    from regfsck.scanner import Scanner

    registry = locate(crafted.root)
    storage = FilesystemStorage(registry.v2)
    inventory = Scanner(storage, registry).scan()
    plan = plan_deep(storage, inventory, ManifestStore(storage, inventory))
    processes = check_layers(storage, plan, jobs=2)
    monkeypatch.setenv("REGFSCK_DEEP_PROCESSES", "0")
    threads = check_layers(storage, plan, jobs=2)
    assert [f.to_json() for f in processes.findings] == [f.to_json() for f in threads.findings]
    assert processes.summary == threads.summary
    monkeypatch.delenv("REGFSCK_DEEP_PROCESSES")
    stop = threading.Event()
    stopped = check_layers(storage, plan, jobs=2, stop=stop, on_outcome=lambda _o: stop.set())
    assert stopped.summary.interrupted
    assert 1 <= stopped.summary.layers_checked < stopped.summary.layers_total
