"""The stream checkers behind `verify --deep`: the strict tar walker and the zstd frame walker.

Property tests: every archive Python's tarfile writes (USTAR, GNU, PAX; long names, big
sizes, links, directories) is accepted however it is split into chunks; cutting it inside
a member, or flipping a byte of a header, is refused; zstd streams are accepted exactly when
they end at a frame boundary.
"""

from __future__ import annotations

import io
import struct
import tarfile

import pytest
import zstandard
from hypothesis import given
from hypothesis import strategies as st

from regfsck.deep import (
    LayerFormatError,
    TarStreamChecker,
    ZstdFrameChecker,
    declared_compression,
    sniff_compression,
)

names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._-", min_size=1, max_size=140)
entries = st.lists(st.tuples(names, st.one_of(st.just(None), st.binary(max_size=1500))),
                   min_size=0, max_size=6)
formats = st.sampled_from([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])


def make_tar(items: list[tuple[str, bytes | None]], fmt: int) -> tuple[bytes, list[tuple[int, int]]]:
    """A tar of `items` (None = directory) and each member's (data offset, size)."""
    buf = io.BytesIO()
    spans: list[tuple[int, int]] = []
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for i, (name, data) in enumerate(items):
            if fmt == tarfile.USTAR_FORMAT:
                name = name[:90]
            info = tarfile.TarInfo(f"{i}/{name}")
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
        spans = [(m.offset_data, m.size) for m in tar.getmembers()]
    return raw, spans


def check(raw: bytes, cuts: list[int] | None = None) -> TarStreamChecker:
    checker = TarStreamChecker()
    start = 0
    for cut in sorted(cuts or []):
        checker.feed(raw[start:cut])
        start = max(start, cut)
    checker.feed(raw[start:])
    checker.finish()
    return checker


@given(entries, formats, st.lists(st.integers(min_value=0, max_value=20000), max_size=8))
def test_tarfile_archives_pass_in_any_chunking(items: list[tuple[str, bytes | None]], fmt: int,
                                               cuts: list[int]) -> None:
    raw, _ = make_tar(items, fmt)
    checker = check(raw, [c % (len(raw) + 1) for c in cuts])
    assert checker.entries == len(items)
    assert checker.ended


@given(entries.filter(lambda items: any(d for _, d in items)), formats, st.data())
def test_truncated_member_data_is_refused(items: list[tuple[str, bytes | None]], fmt: int,
                                          data: st.DataObject) -> None:
    raw, spans = make_tar(items, fmt)
    offset, size = data.draw(st.sampled_from([s for s in spans if s[1]]))
    cut = data.draw(st.integers(min_value=offset, max_value=offset + size - 1))
    with pytest.raises(LayerFormatError, match="ends inside"):
        check(raw[:cut])


@given(entries.filter(bool), formats, st.integers(min_value=0, max_value=99), st.integers(1, 255))
def test_flipped_header_byte_is_refused(items: list[tuple[str, bytes | None]], fmt: int,
                                        position: int, delta: int) -> None:
    raw = bytearray(make_tar(items, fmt)[0])
    raw[position] = (raw[position] + delta) % 256
    with pytest.raises(LayerFormatError):
        check(bytes(raw))


def test_stream_may_end_at_a_header_boundary_like_go() -> None:
    raw, _ = make_tar([("a", b"x" * 700)], tarfile.PAX_FORMAT)
    member_end = 512 + 1024  # header + data padded to two blocks
    check(raw[:member_end])  # no end-of-archive marker at all
    check(raw[:member_end + 512])  # one zero block
    check(b"")  # an empty stream
    with pytest.raises(LayerFormatError, match="inside a tar header"):
        check(raw[:member_end + 100])


def test_zero_block_then_header_is_refused() -> None:
    one, _ = make_tar([("a", b"1")], tarfile.USTAR_FORMAT)
    two, _ = make_tar([("b", b"2")], tarfile.USTAR_FORMAT)
    with pytest.raises(LayerFormatError, match="zero block is followed"):
        check(one[:1024] + bytes(512) + two)


def test_pax_size_override_and_base256_sizes() -> None:
    big_header = tarfile.TarInfo("big")
    big_header.size = 9 * 1024**3  # > 8 GiB: GNU base-256 / PAX size record
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        header = big_header.tobuf(fmt, "utf-8", "surrogateescape")
        checker = TarStreamChecker()
        checker.feed(header)
        with pytest.raises(LayerFormatError, match="inside the data"):
            checker.finish()
        assert checker._data_left == 9 * 1024**3  # the walker knows how much data follows


def test_malformed_pax_record_is_refused() -> None:
    info = tarfile.TarInfo("./PaxHeaders/x")
    payload = b"99 size=1\n"
    info.type = tarfile.XHDTYPE
    info.size = len(payload)
    raw = info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape") + payload.ljust(512, b"\0")
    with pytest.raises(LayerFormatError, match="malformed pax record"):
        check(raw)


def zstd_frames() -> tuple[bytes, list[int]]:
    """Two zstd frames and a skippable frame, with the offsets where each one ends."""
    compressor = zstandard.ZstdCompressor(level=3, write_checksum=True)
    first = compressor.compress(b"first frame " * 5000)
    second = zstandard.ZstdCompressor(level=1).compress(bytes(range(256)) * 40)
    skippable = struct.pack("<II", 0x184D2A5E, 6) + b"chunky"
    stream = first + second + skippable
    return stream, [len(first), len(first) + len(second), len(stream)]


def test_zstd_frames_accepted_only_at_frame_boundaries() -> None:
    stream, boundaries = zstd_frames()
    for cut in range(1, len(stream) + 1):
        checker = ZstdFrameChecker()
        checker.feed(stream[:cut])
        if cut in boundaries:
            checker.finish()
        else:
            with pytest.raises(LayerFormatError):
                checker.finish()


def test_zstd_garbage_after_frames_is_refused() -> None:
    stream, _ = zstd_frames()
    checker = ZstdFrameChecker()
    with pytest.raises(LayerFormatError, match="not a zstd frame"):
        checker.feed(stream + b"\0\0\0\0")


@pytest.mark.parametrize(("media_type", "expected"), [
    ("application/vnd.docker.image.rootfs.diff.tar.gzip", "gzip"),
    ("application/vnd.oci.image.layer.v1.tar+gzip", "gzip"),
    ("application/vnd.oci.image.layer.v1.tar+zstd", "zstd"),
    ("application/vnd.oci.image.layer.v1.tar", "none"),
    ("application/vnd.docker.image.rootfs.diff.tar", "none"),
    ("application/vnd.oci.image.layer.v1.tar+gzip+encrypted", None),
    ("", None),
])
def test_declared_compression(media_type: str, expected: str | None) -> None:
    assert declared_compression(media_type) == expected


def test_sniff() -> None:
    assert sniff_compression(b"\x1f\x8b\x08\x00") == "gzip"
    assert sniff_compression(b"\x28\xb5\x2f\xfd") == "zstd"
    assert sniff_compression(b"./\0\0") == "none"
