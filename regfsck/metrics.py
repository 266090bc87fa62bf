"""`verify --metrics-file`: the run as Prometheus text-format metrics for node_exporter's
textfile collector.

Monitoring reads the file at any moment, so it is written whole or not at all: the text
goes to a temporary file in the same directory (same file system) which is then renamed
over the target. A failed write removes the temporary file and leaves the previous
metrics in place; their old timestamp is what tells monitoring that the nightly run is
not happening. The metrics use their own registry, never prometheus-client's global one
(which would add the process metrics of this short-lived command).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge, generate_latest

from regfsck import __version__
from regfsck.findings import CATALOG, Finding
from regfsck.gc import GcOptions, plan_from_inventory
from regfsck.graph import ManifestStore
from regfsck.inventory import Inventory
from regfsck.storage import Storage
from regfsck.verify import VerifyReport

GC_MODES = {"default": False, "delete_untagged": True}


class MetricsWriteError(OSError):
    """The metrics file could not be written (the previous one, if any, is untouched)."""


@dataclass(frozen=True)
class GcOutlook:
    """What gc would reclaim now, per mode, and whether damage makes it refuse."""

    reclaimable_bytes: Mapping[str, int] = field(default_factory=dict)
    blocked: Mapping[str, bool] = field(default_factory=dict)


def gc_outlook(inv: Inventory, storage: Storage, now: datetime,
               findings: Iterable[Finding] | None) -> GcOutlook:
    """Plan gc in both modes on verify's own scan (read-only: only the plan is built).

    `findings` are the structural findings of the whole tree when verify has them (so the
    checks do not run twice); None runs gc's own checks (a `--repo` verify saw only part)."""
    found = list(findings) if findings is not None else None
    store = ManifestStore(storage, inv)
    reclaimable: dict[str, int] = {}
    blocked: dict[str, bool] = {}
    for mode, untagged in GC_MODES.items():
        plan = plan_from_inventory(inv, store, storage, GcOptions(delete_untagged=untagged),
                                   now=now, findings=found)
        reclaimable[mode] = plan.reclaimable_bytes
        blocked[mode] = plan.is_blocked
    return GcOutlook(reclaimable, blocked)


@dataclass(frozen=True)
class RunFacts:
    """What the command knows about the run besides the report."""

    root: str
    started: datetime
    finished: datetime
    exit_status: int
    repos: tuple[str, ...] = ()  # --repo: the run covered only these


def verify_metrics(report: VerifyReport | None, facts: RunFacts,
                   outlook: GcOutlook | None = None) -> bytes:
    """The metrics text. `report` is None when verify could not run at all: then only the
    run time, its exit status and `complete 0` are written, which is what an alert needs."""
    registry = CollectorRegistry(auto_describe=True)
    labels = {"root": facts.root}

    def gauge(name: str, doc: str, value: float, **extra: str) -> None:
        g = Gauge(f"regfsck_verify_{name}", doc, [*labels, *extra], registry=registry)
        g.labels(**labels, **extra).set(value)

    gauge("info", "regfsck version and the scope of the run (1).", 1, version=__version__,
          scope="repos" if facts.repos else "all")
    gauge("last_run_timestamp_seconds", "When the last verify run ended (Unix time).",
          facts.finished.timestamp())
    gauge("duration_seconds", "How long the last verify run took.",
          max(0.0, (facts.finished - facts.started).total_seconds()))
    gauge("exit_status", "Exit status of the last run: 0 clean, 1 errors found, 2 usage, "
          "3 cannot run, 130 interrupted.", facts.exit_status)
    s = report.summary if report is not None else None
    complete = (s is not None and not s.interrupted and not s.stopped_at_limit
                and s.blobs_deferred == 0)
    gauge("complete", "1 when the run checked everything it chose to check (not "
          "interrupted, not stopped by --max-duration, not failed).", int(complete))
    if report is None or s is None:
        return generate_latest(registry)
    gauge("blobs_verified", "Blobs re-hashed by the last run.", s.blobs_verified)
    gauge("bytes_verified", "Bytes re-hashed by the last run.", s.bytes_verified)
    gauge("blobs_in_scope", "Blobs the last run could have re-hashed.", s.blobs_total)
    gauge("bytes_in_scope", "Bytes the last run could have re-hashed.", s.bytes_total)
    gauge("blobs_skipped", "Blobs not re-hashed: the verification record vouches for them.",
          s.blobs_skipped)
    gauge("blobs_deferred", "Blobs chosen but left for the next run (time limit, Ctrl-C).",
          s.blobs_deferred)
    gauge("bytes_deferred", "Bytes chosen but left for the next run.", s.bytes_deferred)

    counts = Counter((f.kind, str(f.severity)) for f in report.findings)
    for kind, info in CATALOG.items():  # zeros too: `> 0` alerts need a series to compare
        counts.setdefault((kind, str(info.severity)), 0)
    findings = Gauge("regfsck_verify_findings", "Findings of the last run by kind and severity.",
                     [*labels, "kind", "severity"], registry=registry)
    for (kind, severity), n in sorted(counts.items()):
        findings.labels(**labels, kind=kind, severity=severity).set(n)
    by_severity = Counter(str(f.severity) for f in report.findings)
    severities = Gauge("regfsck_verify_findings_by_severity", "Findings of the last run by "
                       "severity.", [*labels, "severity"], registry=registry)
    for severity in ("error", "warning", "info"):
        severities.labels(**labels, severity=severity).set(by_severity[severity])

    if outlook is not None:
        reclaim = Gauge("regfsck_gc_reclaimable_bytes", "Bytes `regfsck gc` would free now "
                        "(blobs and stale uploads), per mode: default or --delete-untagged.",
                        [*labels, "mode"], registry=registry)
        blocked = Gauge("regfsck_gc_blocked", "1 when damage makes gc refuse to collect "
                        "(without --force).", [*labels, "mode"], registry=registry)
        for mode, value in sorted(outlook.reclaimable_bytes.items()):
            reclaim.labels(**labels, mode=mode).set(value)
            blocked.labels(**labels, mode=mode).set(int(outlook.blocked.get(mode, False)))
    return generate_latest(registry)


def write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to `path` whole or not at all (`report.write_atomically`: temp file in
    the same directory, fsync, rename); node_exporter only reads `*.prom`, so the temp
    file's name never ends so."""
    from regfsck.report import ReportWriteError
    from regfsck.report import write_atomically as write

    try:
        write(path, data, "metrics file")
    except ReportWriteError as exc:
        raise MetricsWriteError(str(exc)) from exc
