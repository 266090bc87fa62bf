"""The verify command's engine: scan, structural checks, then content re-hashing."""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from regfsck.checks import FindingSet, TreeChecker
from regfsck.digest import EMPTY_SHA256
from regfsck.document import Document
from regfsck.errors import UsageError
from regfsck.findings import BLOB_KINDS, Finding, Severity, make_finding, strict_severity
from regfsck.graph import ManifestStore, reachable, tag_users
from regfsck.incremental import DEFAULT_MAX_AGE, Selection, SelectionOptions, select_blobs
from regfsck.inventory import Blob, Inventory
from regfsck.report import Shard, finding_order, tree_fingerprint
from regfsck.root import RegistryRoot
from regfsck.scanner import Scanner
from regfsck.storage import FilesystemStorage, Storage, StorageError, open_storage

if TYPE_CHECKING:  # loaded when used: `verify --no-data` needs neither hashing nor the record
    from regfsck.deep import DeepPlan, DeepProgress, DeepReport, DeepSummary, LayerOutcome
    from regfsck.hashing import HashOutcome
    from regfsck.record import VerifyRecord


@dataclass
class VerifyOptions:
    jobs: int = 1
    repos: set[str] | None = None  # None: whole tree
    check_data: bool = True
    strict: bool = False  # warnings that make an image unpullable count as errors
    changed_only: bool = False  # re-hash only blobs the record does not vouch for
    max_age: timedelta = DEFAULT_MAX_AGE  # with changed_only: verdicts older than this expire
    sample_percent: float | None = None  # plus the stalest P% of the bytes (rotating pass)
    max_duration: timedelta | None = None  # stop hashing at this much time after the start
    deep: bool = False  # also decompress every layer (regfsck.deep), reading each one once
    state_dir: Path | None = None  # object storage: where the record lives (record_base)
    shard: Shard | None = None  # hash (and report) only what this shard owns (regfsck.report)

    @property
    def incremental(self) -> bool:
        """The record chooses what is hashed (not every blob in scope)."""
        return self.changed_only or self.sample_percent is not None or self.max_duration is not None

    def identity(self) -> dict[str, Any]:
        """What must be the same in every shard of one run for their merge to mean what an
        unsharded run with these options means (not --jobs, not where the record is)."""
        return {"repos": sorted(self.repos) if self.repos is not None else None,
                "check_data": self.check_data, "strict": self.strict, "deep": self.deep,
                "changed_only": self.changed_only,
                "max_age": self.max_age.total_seconds() if self.changed_only else None,
                "sample_percent": self.sample_percent,
                "max_duration": None if self.max_duration is None
                else self.max_duration.total_seconds()}

    @property
    def needs_record(self) -> bool:
        """The incremental flags cannot work without the verification record."""
        return self.check_data and self.incremental


@dataclass
class VerifySummary(Document):
    errors: int = 0
    warnings: int = 0
    infos: int = 0
    blobs_verified: int = 0
    bytes_verified: int = 0
    blobs_total: int = 0
    bytes_total: int = 0
    interrupted: bool = False
    blobs_skipped: int = 0  # left out: the record vouches for them (--changed-only/--sample)
    bytes_skipped: int = 0
    blobs_deferred: int = 0  # chosen but not reached before --max-duration (or Ctrl-C)
    bytes_deferred: int = 0
    stopped_at_limit: bool = False  # --max-duration ended the hashing
    hashed_because: dict[str, int] = field(default_factory=dict)  # reason -> blobs chosen
    record: str | None = None  # the verification record used (relative to ROOT)
    record_error: str | None = None  # why an existing record could not be updated


@dataclass
class VerifyReport:
    findings: list[Finding] = field(default_factory=list)
    summary: VerifySummary = field(default_factory=VerifySummary)
    deep: DeepSummary | None = None  # with options.deep, unless interrupted before the layers
    shard: dict[str, object] | None = None  # with options.shard: which run this is a part of

    def to_json(self) -> dict[str, object]:
        doc: dict[str, object] = {"findings": [f.to_json() for f in self.findings],
                                  "summary": self.summary.to_json()}
        if self.shard is not None:
            doc["shard"] = self.shard
        return doc


class UnknownRepositoryError(UsageError, LookupError):
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
               on_finding: Callable[[Finding], None] | None = None,
               deep_progress: DeepProgress | None = None,
               storage: Storage | None = None) -> VerifyReport:
    """Run every check; `stop` (set on Ctrl-C) ends hashing early with a partial summary.

    With `options.deep`, layers are read once: the deep pass hashes each layer blob's bytes
    as it decompresses them, and that digest is the layer's plain verdict (the plain pass
    leaves layers out). Raises RecordError when the incremental options need the verification record and it
    cannot be used (a plain run just reports why it could not update an existing one)."""
    from regfsck.deep import check_layers, plan_deep

    started = time.monotonic()
    if storage is None:  # `storage`: the one `inventory` was scanned from (listed once)
        storage = open_storage(root, jobs=options.jobs if root.is_object_storage else None)
    inv = inventory if inventory is not None else Scanner(storage, root).scan()
    if options.repos:
        unknown = sorted(options.repos - set(inv.repositories))
        if unknown:
            raise UnknownRepositoryError(f"no such repository: {', '.join(unknown)}")
    # Object storage, with data: each manifest the checks read is hashed as it is read, and
    # the hashing pass takes that verdict instead of a second GET of the same bytes. (A
    # local tree's manifests mostly come parsed from the scan's worker processes, and a
    # second read of a small file there costs no request: it is hashed as every blob is.)
    store = ManifestStore(storage, inv, keep_intact=options.check_data and
                          not isinstance(storage, FilesystemStorage))
    now = datetime.now(UTC)
    findings = FindingSet()
    findings.extend(TreeChecker(inv, store, now=now).run(options.repos))
    summary = VerifySummary()
    deep_plan = plan_deep(storage, inv, store, options.repos) if options.deep else None
    if deep_plan is not None and options.shard is not None:
        deep_plan = _shard_deep_plan(deep_plan, options.shard)
    deep: DeepReport | None = None
    # The checks' store, when nothing needed it freed (--no-data), finds the affected tags
    # below: a second store would read and hold every tagged image's manifests again
    # (memory, issue 15).
    checked: ManifestStore | None = None
    if options.check_data:
        blobs = _blobs_to_hash(inv, store, options.repos)
        if options.shard is not None:
            blobs = [b for b in blobs if options.shard.owns(b.digest)]
        intact = store.intact()
        del store  # the parsed manifests are not needed to hash: free them first
        record = _open_record(root, options, summary)
        try:
            deep = _hash_blobs(storage, inv, blobs, options, record,
                               summary, findings, intact=intact, progress=progress, stop=stop,
                               on_finding=on_finding, deep_plan=deep_plan,
                               deep_progress=deep_progress,
                               deadline=None if options.max_duration is None
                               else started + options.max_duration.total_seconds())
        finally:
            if record is not None and summary.record_error is None:
                _record(record, summary, record.close)
    elif deep_plan is not None:
        del store
        deep = check_layers(storage, deep_plan, jobs=options.jobs, progress=deep_progress, stop=stop)
    else:
        checked = store
    if deep is not None:
        findings.extend(deep.findings)
        summary.interrupted = summary.interrupted or deep.summary.interrupted
    found = with_affected_tags(findings.findings(), inv,
                               checked if checked is not None else ManifestStore(storage, inv))
    if options.shard is not None:  # each finding is reported by one shard (regfsck.report)
        found = [f for f in found if options.shard.owns_finding(f.digest)]
    if options.strict:
        found = [replace(f, severity=strict_severity(f)) for f in found]
    report = VerifyReport(sorted(found, key=_finding_order), summary,
                          deep.summary if deep is not None else None,
                          _shard_section(root, inv, options) if options.shard else None)
    for finding in report.findings:
        if finding.severity is Severity.ERROR:
            summary.errors += 1
        elif finding.severity is Severity.WARNING:
            summary.warnings += 1
        else:
            summary.infos += 1
    return report


def with_affected_tags(found: list[Finding], inv: Inventory, store: ManifestStore) -> list[Finding]:
    """Findings about a blob name every `repo:tag` whose image needs it (graph.tag_users),
    not only the tags of the repository where the check happened to meet it."""
    wanted = {f.digest for f in found if f.kind in BLOB_KINDS and f.digest}
    if not wanted:
        return found
    users = tag_users(inv, store, wanted)
    out = []
    for finding in found:
        extra = users.get(finding.digest or "") if finding.kind in BLOB_KINDS else None
        if extra:
            finding = replace(finding, affected_tags=tuple(sorted(set(finding.affected_tags) | extra)))
        out.append(finding)
    return out


def _open_record(root: RegistryRoot, options: VerifyOptions,
                 summary: VerifySummary) -> VerifyRecord | None:
    """The record: required (and created) for the incremental options, else updated if present."""
    from regfsck.record import RECORD_REL, RecordError, VerifyRecord

    try:
        record = VerifyRecord.open(root, create=options.needs_record, state_dir=options.state_dir)
    except RecordError as exc:
        if options.needs_record:
            raise
        summary.record_error = str(exc)
        return None
    if record is not None:  # relative to ROOT; an object-storage tree's is a local path
        summary.record = record.where if root.is_object_storage else RECORD_REL
    return record


def _shard_deep_plan(plan: DeepPlan, shard: Shard) -> DeepPlan:
    """The layers this shard decompresses; the configs' findings stay (every shard reads
    them, the owner of each config's digest reports them) and shard 0 counts the images."""
    return replace(plan, jobs=[j for j in plan.jobs if shard.owns(j.digest)],
                   images=plan.images if shard.index == 0 else 0)


def _shard_section(root: RegistryRoot, inv: Inventory, options: VerifyOptions) -> dict[str, object]:
    """The `shard` section of a shard's report: what `report merge` checks the shards of
    one run share (version, root, the tree as listed, options) and which part this is."""
    from regfsck import __version__

    assert options.shard is not None
    return {"index": options.shard.index, "count": options.shard.count,
            "regfsck": __version__, "root": root.display, "tree": tree_fingerprint(inv),
            "options": options.identity()}


def _select(blobs: list[Blob], options: VerifyOptions, record: VerifyRecord | None) -> Selection:
    if not options.incremental:
        return Selection(to_hash=blobs)  # the plain full run: everything, in inode order
    entries = record.entries() if record is not None else {}
    return select_blobs(blobs, entries, SelectionOptions(
        changed_only=options.changed_only, max_age=options.max_age,
        sample_percent=options.sample_percent), time.time())


def _hash_blobs(storage: Storage, inv: Inventory, blobs: list[Blob],
                options: VerifyOptions, record: VerifyRecord | None, summary: VerifySummary,
                findings: FindingSet, *, intact: set[str] | None = None,
                progress: DataProgress | None,
                stop: threading.Event | None, on_finding: Callable[[Finding], None] | None,
                deadline: float | None, deep_plan: DeepPlan | None = None,
                deep_progress: DeepProgress | None = None) -> DeepReport | None:
    """Re-hash the chosen blobs, keeping the record in step with every verdict.

    With a deep plan, the layers it reads are left out of the plain pass and take their
    verdict from the deep pass that follows (all of them, whatever the incremental
    options: the deep pass reads them anyway). Returns the deep report (None without a
    plan, or when Ctrl-C came before the layers). `intact`: blobs whose bytes were already
    read from storage and hashed to their digest at their listed size (the manifests the
    structural checks read, ManifestStore.intact): their verdict is that one, not a second
    read of the same bytes."""
    from regfsck.deep import check_layers
    from regfsck.hashing import HashOutcome, verify_blobs

    layers = _deep_layers(blobs, deep_plan)
    plain = [b for b in blobs if b.digest not in layers] if layers else blobs
    selection = _select(plain, options, record)
    chosen = selection.to_hash
    summary.blobs_total = len(blobs)
    summary.bytes_total = sum(b.size for b in blobs)
    summary.blobs_skipped, summary.bytes_skipped = selection.skipped, selection.skipped_bytes
    summary.hashed_because = selection.counts()
    if layers and options.incremental:  # (not "if anything else was chosen": shards add up)
        summary.hashed_because["read by --deep"] = len(layers)
    limit_hit = threading.Event()  # the time limit: set by the timer only
    halt = _Either(limit_hit, *(() if stop is None else (stop,)))  # what hashing obeys
    timer: threading.Timer | None = None
    if deadline is not None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            limit_hit.set()
            chosen = []
        else:
            timer = threading.Timer(remaining, limit_hit.set)
            timer.daemon = True
            timer.start()
    verdict_time = time.time()  # one time per run: the next run re-reads them in inode order
    done = 0
    done_bytes = 0

    def take(outcome: HashOutcome) -> None:
        nonlocal done, done_bytes
        done += 1
        done_bytes += outcome.blob.size
        if outcome.actual is not None:
            summary.blobs_verified += 1
            summary.bytes_verified += outcome.bytes_read
        if outcome.ok:
            if record is not None:
                _record(record, summary,
                        functools.partial(record.record_good, outcome.blob, verdict_time))
            return
        if record is not None:
            _record(record, summary, functools.partial(record.record_bad, outcome.blob.digest))
        finding = _hash_finding(outcome)
        findings.add(finding)
        if on_finding is not None:
            on_finding(finding)

    def take_layer(outcome: LayerOutcome) -> None:
        blob = layers.get(outcome.job.digest)
        if blob is not None:
            take(_layer_verdict(storage, blob, outcome))

    if progress is not None:
        progress.start(sum(b.size for b in chosen), len(chosen))
    intact = intact or set()
    hashed = [b for b in chosen if b.digest in intact]
    to_read = [b for b in chosen if b.digest not in intact] if hashed else chosen
    try:
        for blob in hashed:
            if halt.is_set():
                break
            take(HashOutcome(blob, blob.digest, blob.size))
            if progress is not None:
                progress.advance(blob.size)
        for outcome in verify_blobs(storage, to_read, jobs=options.jobs,
                                    on_bytes=progress.advance if progress else None, stop=halt):
            take(outcome)
    finally:
        if timer is not None:
            timer.cancel()
        if progress is not None:
            progress.finish()
    deep: DeepReport | None = None
    if deep_plan is not None and not (stop is not None and stop.is_set()):
        deep = check_layers(storage, deep_plan, jobs=options.jobs, progress=deep_progress,
                            stop=stop, on_outcome=take_layer)
    planned = [*selection.to_hash, *layers.values()]
    summary.blobs_deferred = len(planned) - done
    summary.bytes_deferred = sum(b.size for b in planned) - done_bytes
    summary.stopped_at_limit = limit_hit.is_set() and summary.blobs_deferred > 0
    summary.interrupted = stop is not None and stop.is_set() and not limit_hit.is_set()
    if record is not None and options.repos is None and not halt.is_set():
        _record(record, summary, lambda: record.prune(inv.blobs))
    return deep


def _deep_layers(blobs: list[Blob], plan: DeepPlan | None) -> dict[str, Blob]:
    """The blobs to hash that the deep pass reads (and can hash: a known algorithm)."""
    from regfsck.deep import blob_hasher

    if plan is None:
        return {}
    by_digest = {b.digest: b for b in blobs}
    return {j.digest: by_digest[j.digest] for j in plan.jobs
            if j.digest in by_digest and blob_hasher(j.digest) is not None}


def _layer_verdict(storage: Storage, blob: Blob, outcome: LayerOutcome) -> HashOutcome:
    """The plain verdict on a layer the deep pass read: its blob digest, with the plain
    pass's rule that a mismatch is re-read once before it is reported."""
    from regfsck.hashing import HashOutcome, hash_file

    if outcome.blob_digest is None:
        return HashOutcome(blob, None, 0, outcome.read_error or "unreadable")
    if outcome.blob_digest == blob.digest:
        return HashOutcome(blob, outcome.blob_digest, outcome.bytes_read)
    try:
        actual, read = hash_file(storage, blob.path, blob.digest.partition(":")[0])
    except StorageError as exc:
        return HashOutcome(blob, None, 0, exc.message)
    return HashOutcome(blob, actual, read)


class _Either(threading.Event):
    """Set when it is set itself or when any of `others` is: hashing stops for the time
    limit or for Ctrl-C, while the caller's event keeps meaning "the user interrupted"."""

    def __init__(self, *others: threading.Event) -> None:
        super().__init__()
        self._others = others

    def is_set(self) -> bool:
        return super().is_set() or any(o.is_set() for o in self._others)


def _record(record: VerifyRecord, summary: VerifySummary, write: Callable[[], object]) -> None:
    """Write to the record; a failure is reported once and never stops the verification.

    A record that cannot be written is deleted (if it can be): it might otherwise keep
    vouching for a blob this run found bad."""
    from regfsck.record import RecordError

    if summary.record_error is not None:
        return
    try:
        write()
    except RecordError as exc:
        removed = record.invalidate()
        summary.record_error = f"{exc} ({'record deleted' if removed else 'could not delete it'})"


def _finding_order(f: Finding) -> tuple[object, ...]:
    """report.finding_order: one total order, so a merge of shards lists what a run does."""
    return finding_order(f.to_json())
