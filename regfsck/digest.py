"""Digest strings as the registry writes them: `<alg>:<lowercase hex>`.

The registry's link files hold exactly one digest with no whitespace; anything else
aborts the official GC. Parsing is therefore strict, and the bytes that failed are
kept so findings can say what was found instead.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NewType

from regfsck.errors import UsageError

HEX_LENGTHS: dict[str, int] = {"sha256": 64, "sha384": 96, "sha512": 128}
EMPTY_SHA256 = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
EMPTY_JSON_SHA256 = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"

_HEX_RE = re.compile(r"[a-f0-9]+")

# A digest as text, `<alg>:<hex>`: what a link file holds and what a path names. A plain
# `str` is accepted wherever a digest is read; functions that produce one from a path or
# a parse say so with this type.
Digest = NewType("Digest", str)


class DigestError(ValueError):
    """Raised when a string is not a digest the registry would accept."""


class DigestArgumentError(DigestError, UsageError):
    """A digest or prefix typed by the operator that names no single candidate (exit 2)."""


@dataclass(frozen=True, order=True, slots=True)
class ParsedDigest:
    """A validated digest; `str(d)` is the exact link-file content."""

    algorithm: str
    hex: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    @property
    def text(self) -> Digest:
        return Digest(str(self))


def is_valid_hex(algorithm: str, hex_part: str) -> bool:
    """True when `hex_part` is lowercase hex of the right length for `algorithm`."""
    length = HEX_LENGTHS.get(algorithm)
    return length is not None and len(hex_part) == length and _HEX_RE.fullmatch(hex_part) is not None


def parse_digest(text: str) -> ParsedDigest:
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
    return ParsedDigest(algorithm, hex_part)


def is_digest(text: str) -> bool:
    """True when `text` parses as a digest."""
    try:
        parse_digest(text)
    except DigestError:
        return False
    return True


def parse_link_content(raw: bytes) -> ParsedDigest:
    """Parse the bytes of a link file; the whole file must be the digest and nothing else."""
    if not raw:
        raise DigestError("empty link file")
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError as exc:
        raise DigestError(f"non-ASCII bytes in link file: {quote_bytes(raw[:80])}") from exc
    if text != text.strip():
        raise DigestError(f"whitespace around digest: {quote_bytes(raw[:80])}")
    return parse_digest(text)


def describe_bad_link(raw: bytes) -> str:
    """Say in a few words what is wrong with link content (for messages)."""
    try:
        parse_link_content(raw)
    except DigestError as exc:
        return str(exc)
    return "valid"


_PREFIX_RE = re.compile(r"(?:(sha256|sha384|sha512):)?([a-f0-9]{4,128})")
MIN_PREFIX = 4  # as git: at least 4 hex digits


def is_digest_prefix(text: str) -> bool:
    """`sha256:6d7e7209` or `6d7e7209`: at least 4 lowercase hex digits, as git takes them."""
    return _PREFIX_RE.fullmatch(text) is not None


def expand_digest(text: str, candidates: Iterable[str], what: str = "digest") -> str:
    """The one digest of `candidates` that `text` (a full digest, `sha256:6d7e7209` or
    `6d7e7209`) names; DigestArgumentError (one line, exit 2) when none or several match."""
    if is_digest(text):
        return text
    match = _PREFIX_RE.fullmatch(text)
    if match is None:
        raise DigestArgumentError(f"not a digest or a digest prefix (4+ lowercase hex digits): {text[:80]!r}")
    prefix = f"{match.group(1) or 'sha256'}:{match.group(2)}"
    found = sorted({c for c in candidates if c.startswith(prefix)})
    if not found:
        raise DigestArgumentError(f"no {what} starts with {text}")
    if len(found) > 1:
        shown = ", ".join(f[:len(prefix) + 4] + "..." for f in found[:5])
        more = f" and {len(found) - 5} more" if len(found) > 5 else ""
        raise DigestArgumentError(f"{text} is ambiguous: {len(found)} {what}s start with it ({shown}{more}); "
                          "give more digits")
    return found[0]


def quote_bytes(raw: bytes) -> str:
    """Bytes for a message: `"sha256:ab\\n"`, not Python's `b'sha256:ab\\n'`."""
    text = raw.decode("utf-8", "backslashreplace")
    escaped = "".join(
        {"\n": "\\n", "\r": "\\r", "\t": "\\t", '"': '\\"'}.get(c, c) if c in '\n\r\t"'
        else (c if 32 <= ord(c) != 127 else f"\\x{ord(c):02x}") for c in text)
    return f'"{escaped}"'
