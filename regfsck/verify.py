"""The verify command's engine: scan, structural checks, then content re-hashing."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from regfsck.checks import FindingSet, TreeChecker
from regfsck.digest import EMPTY_SHA256
from regfsck.findings import Finding, Severity, make_finding
from regfsck.graph import ManifestStore, reachable
from regfsck.hashing import HashOutcome, verify_blobs
from regfsck.inventory import Blob, Inventory
from regfsck.root import RegistryRoot
from regfsck.scanner import Scanner
from regfsck.storage import FilesystemStorage


@dataclass
class VerifyOptions:
    jobs: int = 1
    repos: set[str] | None = None  # None: whole tree
    check_data: bool = True
    strict: bool = False  # warnings that make an image unpullable count as errors


# Warnings that mean "listed by the registry but cannot be pulled": errors under --strict.
STRICT_ERRORS = frozenset({"tag_no_current", "layer_link_dangling", "subject_missing"})


@dataclass
class VerifySummary:
    errors: int = 0
    warnings: int = 0
    infos: int = 0
    blobs_verified: int = 0
    bytes_verified: int = 0
    blobs_total: int = 0
    bytes_total: int = 0
    interrupted: bool = False

    def to_json(self) -> dict[str, int | bool]:
        return dict(self.__dict__)


@dataclass
class VerifyReport:
    findings: list[Finding] = field(default_factory=list)
    summary: VerifySummary = field(default_factory=VerifySummary)

    def to_json(self) -> dict[str, object]:
        return {"findings": [f.to_json() for f in self.findings],
                "summary": self.summary.to_json()}


class UnknownRepositoryError(LookupError):
    """--repo named a repository the tree does not have."""


class DataProgress:
    """Callbacks a renderer implements to show hashing progress."""

    def start(self, total_bytes: int, total_blobs: int) -> None: ...

    def advance(self, nbytes: int) -> None: ...

    def finish(self) -> None: ...


def _blobs_to_hash(inv: Inventory, store: ManifestStore, repos: set[str] | None) -> list[Blob]:
    if repos is None:
        chosen = list(inv.blobs.values())
    else:
        roots = [d for name in repos if name in inv.repositories
                 for d, link in inv.repositories[name].revisions.items() if link.target == d]
        needed = reachable(store, roots)
        for name in repos:
            repo = inv.repositories.get(name)
            if repo is not None:
                needed.update(link.target for link in repo.layers.values() if link.target)
        chosen = [inv.blobs[d] for d in needed if d in inv.blobs]
    # Zero-byte blobs are already findings; inode order reads the disk front to back.
    return sorted((b for b in chosen if b.size or b.digest == EMPTY_SHA256),
                  key=lambda b: b.inode)


def _hash_finding(outcome: HashOutcome) -> Finding:
    blob = outcome.blob
    if outcome.actual is None:
        return make_finding("blob_unreadable", blob.path, outcome.error or "unreadable",
                            digest=blob.digest)
    return make_finding("blob_digest_mismatch", blob.path,
                        f"data hashes to {outcome.actual} ({outcome.bytes_read} bytes), "
                        "not to its name", digest=blob.digest)


def run_verify(root: RegistryRoot, options: VerifyOptions, *,
               progress: DataProgress | None = None,
               stop: threading.Event | None = None,
               inventory: Inventory | None = None,
               on_finding: Callable[[Finding], None] | None = None) -> VerifyReport:
    """Run every check; `stop` (set on Ctrl-C) ends hashing early with a partial summary."""
    storage = FilesystemStorage(root.v2)
    inv = inventory if inventory is not None else Scanner(storage, root).scan()
    if options.repos:
        unknown = sorted(options.repos - set(inv.repositories))
        if unknown:
            raise UnknownRepositoryError(f"no such repository: {', '.join(unknown)}")
    store = ManifestStore(storage, inv)
    now = datetime.now(UTC)
    findings = FindingSet()
    findings.extend(TreeChecker(inv, store, now=now).run(options.repos))
    summary = VerifySummary()
    if options.check_data:
        blobs = _blobs_to_hash(inv, store, options.repos)
        summary.blobs_total = len(blobs)
        summary.bytes_total = sum(b.size for b in blobs)
        if progress is not None:
            progress.start(summary.bytes_total, summary.blobs_total)
        try:
            for outcome in verify_blobs(storage, blobs, jobs=options.jobs,
                                        on_bytes=progress.advance if progress else None,
                                        stop=stop):
                if outcome.actual is not None:
                    summary.blobs_verified += 1
                    summary.bytes_verified += outcome.bytes_read
                if not outcome.ok:
                    finding = _hash_finding(outcome)
                    findings.add(finding)
                    if on_finding is not None:
                        on_finding(finding)
        finally:
            if progress is not None:
                progress.finish()
        summary.interrupted = stop is not None and stop.is_set()
    found = findings.findings()
    if options.strict:
        found = [replace(f, severity=Severity.ERROR) if f.kind in STRICT_ERRORS else f
                 for f in found]
    report = VerifyReport(sorted(found, key=_finding_order), summary)
    for finding in report.findings:
        if finding.severity is Severity.ERROR:
            summary.errors += 1
        elif finding.severity is Severity.WARNING:
            summary.warnings += 1
        else:
            summary.infos += 1
    return report


_SEVERITY_ORDER = {Severity.ERROR: 0, Severity.WARNING: 1, Severity.INFO: 2}


def _finding_order(f: Finding) -> tuple[int, str, str]:
    return (_SEVERITY_ORDER[f.severity], f.kind, f.path)
