"""Verify split across machines: which shard owns which digest and finding, and merging the
shards' JSON reports back into the one document an unsharded `verify --json` prints.

A fleet-size registry cannot be re-hashed from one machine in a night, so `verify --shard
K/N` hashes only the blobs shard K owns and N copies run in parallel on any scheduler
(a Kubernetes Indexed Job gives each pod `JOB_COMPLETION_INDEX`). Every shard still lists
the whole tree and runs the cheap structural checks (they need the whole graph), so the
rule that keeps a merge equal to an unsharded run is about *reporting*:

* a blob is hashed (and, with `--deep`, decompressed) by the shard of its digest only;
* a finding that names a digest is reported by the shard of that digest; every other
  finding by shard 0. A hash finding names the blob it hashed, so the shard that did the
  work is the one that reports it; a structural finding is computed alike in every shard
  and reported once;
* counts that are not per blob (`deep.images`) are reported by shard 0.

The shard of a digest is a function of its text alone (the first 8 bytes of its SHA-256,
scaled to N), so the assignment does not depend on listing order, on the machine, or on
whether the tree is on a disk or in a bucket, and any string (an odd-named blob directory
too) has exactly one owner. A merge refuses (one line, exit 2) sets of reports that are
not exactly the shards 0..N-1 of one run: missing or repeated shards, different N,
different trees (root, or what the scan listed), regfsck versions or options.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from regfsck.errors import ExitCode, RegfsckError, UsageError

if TYPE_CHECKING:
    from regfsck.inventory import Inventory

SHARD_ENV = "JOB_COMPLETION_INDEX"  # set by Kubernetes in each pod of an Indexed Job
MAX_SHARDS = 100_000


class MergeError(UsageError):
    """The reports given are not the complete set of shards of one run (exit 2)."""


class ReportWriteError(RegfsckError):
    """The report file could not be written (exit 3)."""


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count` (0-based, as JOB_COMPLETION_INDEX)."""

    index: int
    count: int

    def owns(self, digest: str) -> bool:
        """Does this shard hash (and report) `digest`?"""
        return shard_of(digest, self.count) == self.index

    def owns_finding(self, digest: str | None) -> bool:
        """Does this shard report a finding naming `digest` (None: no digest)?"""
        return self.index == 0 if digest is None else self.owns(digest)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def shard_of(digest: str, count: int) -> int:
    """The shard (0..count-1) that owns `digest`: a pure function of the text."""
    key = int.from_bytes(hashlib.sha256(digest.encode("utf-8", "surrogateescape")).digest()[:8])
    return (key * count) >> 64


def parse_shard(text: str, environ: Mapping[str, str] | None = None) -> Shard:
    """`K/N`, or `/N` with K taken from JOB_COMPLETION_INDEX (a Kubernetes Indexed Job)."""
    env = os.environ if environ is None else environ
    index_text, slash, count_text = text.strip().partition("/")
    if not slash:
        raise UsageError(f"--shard {text!r}: give K/N (shard K of N, K from 0), or /N to take K "
                         f"from ${SHARD_ENV}")
    if not index_text:
        index_text = env.get(SHARD_ENV, "")
        if not index_text:
            raise UsageError(f"--shard /{count_text}: K is not given and ${SHARD_ENV} is not set "
                             "(write --shard K/N)")
    try:
        index, count = int(index_text), int(count_text)
    except ValueError:
        raise UsageError(f"--shard {text!r}: K and N must be whole numbers (K/N, e.g. 0/4)") \
            from None
    if not 1 <= count <= MAX_SHARDS:
        raise UsageError(f"--shard {text!r}: N must be between 1 and {MAX_SHARDS}")
    if not 0 <= index < count:
        raise UsageError(f"--shard {index}/{count}: K must be between 0 and {count - 1} "
                         "(shards are numbered from 0, as JOB_COMPLETION_INDEX)")
    return Shard(index, count)


def tree_fingerprint(inv: Inventory) -> str:
    """What the scan listed, as one digest: every blob (digest, size) and every link of every
    repository. Shards of one run see the same tree; a push or a gc between their scans, or
    reports from two different trees, give different fingerprints."""
    h = hashlib.sha256()
    for digest in sorted(inv.blobs):
        h.update(f"b {digest} {inv.blobs[digest].size}\n".encode("utf-8", "surrogateescape"))
    for name in sorted(inv.repositories):
        repo = inv.repositories[name]
        h.update(f"r {name}\n".encode("utf-8", "surrogateescape"))
        for kind, links in (("m", repo.revisions), ("l", repo.layers)):
            for digest in sorted(links):
                h.update(f"{kind} {digest} {links[digest].target}\n".encode(
                    "utf-8", "surrogateescape"))
        for tag, target in sorted(repo.tag_targets().items()):
            h.update(f"t {tag} {target}\n".encode("utf-8", "surrogateescape"))
    return f"sha256:{h.hexdigest()}"


# -- the order of findings (verify's, and the merge's: one definition) -----------------

SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}


def finding_order(doc: Mapping[str, Any]) -> tuple[Any, ...]:
    """A total order on findings (as their JSON): severity, kind, path, then the rest, so
    the same set of findings is listed the same way however it was put together."""
    return (SEVERITY_ORDER.get(str(doc.get("severity")), 3), str(doc.get("kind", "")),
            str(doc.get("path", "")), str(doc.get("repo", "")), str(doc.get("tag", "")),
            str(doc.get("digest", "")), str(doc.get("message", "")),
            tuple(doc.get("affected_tags", ())))


# -- merging -------------------------------------------------------------------------

# Fields of a shard's "shard" section that every shard of one run must share.
_SAME = (("regfsck", "regfsck versions"), ("root", "roots"), ("tree", "trees"),
         ("options", "options"))
_RECOUNTED = ("errors", "warnings", "infos")  # counted again from the merged findings


@dataclass(frozen=True)
class ShardReport:
    name: str  # the file it came from, for messages
    doc: dict[str, Any]

    @property
    def shard(self) -> dict[str, Any]:
        section: dict[str, Any] = self.doc["shard"]
        return section


def load_report(path: Path) -> ShardReport:
    """Read one shard's report; a file that is not one is a one-line error."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RegfsckError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError:
        raise MergeError(f"{path} is not a verify report (not UTF-8 text)") from None
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise MergeError(f"{path} is not a verify report (not JSON: {exc})") from None
    return check_report(str(path), doc)


def check_report(name: str, doc: Any) -> ShardReport:
    """The shape merge relies on, or why `doc` is not a shard's report."""
    if not isinstance(doc, dict):
        raise MergeError(f"{name} is not a verify report (not a JSON object)")
    if "error" in doc and "findings" not in doc:
        raise RegfsckError(f"{name}: that shard failed ({doc.get('error')}): run it again",
                           exit_code=ExitCode.CANNOT_RUN)
    if not isinstance(doc.get("findings"), list) or not isinstance(doc.get("summary"), dict):
        raise MergeError(f"{name} is not a verify --json report (no findings and summary)")
    section = doc.get("shard")
    if not isinstance(section, dict):
        raise MergeError(f"{name} is not a shard's report (written without verify --shard K/N)")
    index, count = section.get("index"), section.get("count")
    if not (isinstance(index, int) and isinstance(count, int) and 0 <= index < count):
        raise MergeError(f"{name}: its shard section has no valid index/count")
    return ShardReport(name, doc)


def merge(reports: Sequence[ShardReport], *, allow_changed_tree: bool = False) -> dict[str, Any]:
    """One document with the schema of an unsharded `verify --json`: the shards' findings
    (each reported by exactly one shard) in verify's order, the summary's counts added up,
    errors/warnings/infos counted again, `deep` and `requests` added up when present.
    Raises MergeError unless `reports` are exactly shards 0..N-1 of one run."""
    if not reports:
        raise MergeError("give the report of every shard (R0.json ... RN-1.json)")
    _check_set(reports, allow_changed_tree=allow_changed_tree)
    findings = sorted((f for r in reports for f in r.doc["findings"]), key=finding_order)
    summary = _merge_summary([r.doc["summary"] for r in reports])
    for key, severity in zip(_RECOUNTED, ("error", "warning", "info"), strict=True):
        summary[key] = sum(1 for f in findings if f.get("severity") == severity)
    out: dict[str, Any] = {"findings": findings, "summary": summary}
    for key in ("deep", "requests"):
        parts = [r.doc[key] for r in reports if isinstance(r.doc.get(key), dict)]
        if parts:
            out[key] = _add_up(parts)
    return out


def exit_code(doc: Mapping[str, Any]) -> ExitCode:
    """verify's exit status for a (merged) report: 130 interrupted, 1 errors, else 0."""
    summary = doc.get("summary", {})
    if summary.get("interrupted"):
        return ExitCode.INTERRUPTED
    return ExitCode.FINDINGS if summary.get("errors") else ExitCode.OK


def _check_set(reports: Sequence[ShardReport], *, allow_changed_tree: bool) -> None:
    first = reports[0]
    counts = {r.shard["count"] for r in reports}
    if len(counts) > 1:
        detail = ", ".join(f"{r.name}: {r.shard['index']}/{r.shard['count']}" for r in reports)
        raise MergeError(f"the reports are shards of different N ({detail})")
    count = first.shard["count"]
    seen: dict[int, str] = {}
    for r in reports:
        index = r.shard["index"]
        if index in seen:
            raise MergeError(f"shard {index}/{count} is given twice ({seen[index]}, {r.name})")
        seen[index] = r.name
    missing = sorted(set(range(count)) - set(seen))
    if missing:
        shown = ", ".join(str(i) for i in missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise MergeError(f"missing {len(missing)} of {count} shards: {shown} (merge needs "
                         "the report of every shard)")
    for r in reports:  # the rule that makes the union a partition (not a hand-made mix)
        shard = Shard(r.shard["index"], count)
        for finding in r.doc["findings"]:
            digest = finding.get("digest") if isinstance(finding, dict) else None
            if not isinstance(finding, dict) or not shard.owns_finding(
                    digest if isinstance(digest, str) else None):
                raise MergeError(f"{r.name} (shard {shard}) holds a finding it does not own "
                                 f"({str(finding)[:120]}): not a report verify --shard wrote")
    for key, what in _SAME:
        if key == "tree" and allow_changed_tree:
            continue
        values = {json.dumps(r.shard.get(key), sort_keys=True) for r in reports}
        if len(values) > 1:
            other = next(r for r in reports if r.shard.get(key) != first.shard.get(key))
            hint = (" (the tree changed between the shards' scans: run them again, or pass "
                    "--allow-changed-tree)") if key == "tree" else ""
            raise MergeError(f"the reports are of different {what}: {first.name} has "
                             f"{_show(first.shard.get(key))}, {other.name} "
                             f"{_show(other.shard.get(key))}{hint}")


def _show(value: Any) -> str:
    return json.dumps(value, sort_keys=True) if not isinstance(value, str) else value


def _merge_summary(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    out = _add_up(parts)
    for key in ("record", "record_error"):  # text: the distinct values, in shard order
        values = list(dict.fromkeys(str(p[key]) for p in parts if p.get(key) is not None))
        out[key] = "; ".join(values) if values else None
    return out


def _add_up(parts: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Numbers added, flags or-ed, mappings added key by key (first part's key order)."""
    out: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            old = out.get(key)
            if isinstance(value, bool):
                out[key] = bool(old) or value
            elif isinstance(value, int | float):
                out[key] = (old or 0) + value
            elif isinstance(value, Mapping):
                out[key] = _add_up([old or {}, value])
            elif key not in out:
                out[key] = value
    return out


def write_atomically(path: Path, data: bytes, what: str = "report") -> None:
    """Write `data` to `path` whole or not at all (temp file in the same directory, fsync,
    rename): a shard killed mid-write leaves no half report for the merge to read. The temp
    file's name ends in `.tmp` (node_exporter reads only `*.prom`)."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise ReportWriteError(f"cannot write {what} {path}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)  # read by another user (node_exporter, the merging job)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise ReportWriteError(f"cannot write {what} {path}: {exc.strerror or exc}") from exc
