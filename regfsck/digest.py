"""Digest strings as the registry writes them: `<alg>:<lowercase hex>`.

The registry's link files hold exactly one digest with no whitespace; anything else
aborts the official GC. Parsing is therefore strict, and the bytes that failed are
kept so findings can say what was found instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

HEX_LENGTHS: dict[str, int] = {"sha256": 64, "sha384": 96, "sha512": 128}
EMPTY_SHA256 = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
EMPTY_JSON_SHA256 = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"

_HEX_RE = re.compile(r"[a-f0-9]+")


class DigestError(ValueError):
    """Raised when a string is not a digest the registry would accept."""


@dataclass(frozen=True, order=True, slots=True)
class Digest:
    """A validated digest; `str(d)` is the exact link-file content."""

    algorithm: str
    hex: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"


def is_valid_hex(algorithm: str, hex_part: str) -> bool:
    """True when `hex_part` is lowercase hex of the right length for `algorithm`."""
    length = HEX_LENGTHS.get(algorithm)
    return length is not None and len(hex_part) == length and _HEX_RE.fullmatch(hex_part) is not None


def parse_digest(text: str) -> Digest:
    """Parse `alg:hex` strictly (no whitespace, lowercase only, known algorithm)."""
    algorithm, sep, hex_part = text.partition(":")
    if not sep:
        raise DigestError(f"not a digest (no ':'): {text[:80]!r}")
    if algorithm not in HEX_LENGTHS:
        raise DigestError(f"unsupported digest algorithm {algorithm[:20]!r}")
    if not is_valid_hex(algorithm, hex_part):
        raise DigestError(
            f"invalid {algorithm} hex (need {HEX_LENGTHS[algorithm]} lowercase hex chars): "
            f"{hex_part[:140]!r}"
        )
    return Digest(algorithm, hex_part)


def is_digest(text: str) -> bool:
    """True when `text` parses as a digest."""
    try:
        parse_digest(text)
    except DigestError:
        return False
    return True


def parse_link_content(raw: bytes) -> Digest:
    """Parse the bytes of a link file; the whole file must be the digest and nothing else."""
    if not raw:
        raise DigestError("empty link file")
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError as exc:
        raise DigestError(f"non-ASCII bytes in link file: {raw[:80]!r}") from exc
    if text != text.strip():
        raise DigestError(f"whitespace around digest: {raw[:80]!r}")
    return parse_digest(text)


def describe_bad_link(raw: bytes) -> str:
    """Say in a few words what is wrong with link content (for messages)."""
    try:
        parse_link_content(raw)
    except DigestError as exc:
        return str(exc)
    return "valid"
