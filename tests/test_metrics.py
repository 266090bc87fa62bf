"""`verify --metrics-file`: node_exporter textfile metrics, read back with prometheus-client's
own parser, through the console script; and the file is whole or absent, never partial."""

from __future__ import annotations

import json
import os
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from regfsck import metrics
from regfsck.metrics import RunFacts, verify_metrics, write_atomically
from regfsck.verify import VerifyReport, VerifySummary
from tests.support import V2
from tests.support.cli import invoke as cli


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of the file, keyed by name and labels (the parser rejects bad syntax)."""
    found: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in found, f"duplicate series {key}"
            found[key] = sample.value
    return found


def value(found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
          **labels: str) -> float:
    matches = [v for (n, ls), v in found.items() if n == name and set(labels.items()) <= ls]
    assert len(matches) == 1, (name, labels, matches)
    return matches[0]


def age_tree(root: Path, days: int = 30) -> None:
    """Make everything old, so that gc's grace period and upload age do not keep it."""
    when = time.time() - days * 86400
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.utime(Path(dirpath) / name, (when, when), follow_symlinks=False)


def test_metrics_match_the_json_report_and_gc_plans(fixture_root: Path, tmp_path: Path) -> None:
    age_tree(fixture_root)
    prom = tmp_path / "textfile" / "regfsck.prom"
    prom.parent.mkdir()
    before = time.time()
    result = cli("verify", str(fixture_root), "--json", "--metrics-file", str(prom))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    found = samples(prom.read_text())
    root = str(fixture_root)
    assert all(dict(ls)["root"] == root for _, ls in found)
    summary = report["summary"]
    assert value(found, "regfsck_verify_blobs_verified") == summary["blobs_verified"] > 0
    assert value(found, "regfsck_verify_bytes_verified") == summary["bytes_verified"] > 0
    assert value(found, "regfsck_verify_exit_status") == 0
    assert value(found, "regfsck_verify_complete") == 1
    assert before <= value(found, "regfsck_verify_last_run_timestamp_seconds") <= time.time()
    assert value(found, "regfsck_verify_duration_seconds") >= 0
    kinds = {(f["kind"], f["severity"]) for f in report["findings"]}
    assert kinds, "the fixture has warnings (schema1, stale upload)"
    for kind, severity in kinds:
        expected = sum(1 for f in report["findings"] if (f["kind"], f["severity"]) == (kind, severity))
        assert value(found, "regfsck_verify_findings", kind=kind, severity=severity) == expected
    assert value(found, "regfsck_verify_findings", kind="blob_digest_mismatch") == 0
    assert value(found, "regfsck_verify_findings_by_severity", severity="warning") == summary["warnings"]
    for mode, flags in (("default", []), ("delete_untagged", ["--delete-untagged"])):
        plan = json.loads(cli("gc", str(fixture_root), "--json", *flags).stdout)
        assert value(found, "regfsck_gc_reclaimable_bytes", mode=mode) == plan["reclaimable_bytes"]
        assert value(found, "regfsck_gc_blocked", mode=mode) == 0
    assert value(found, "regfsck_gc_reclaimable_bytes", mode="default") > 0  # aged: stale upload
    assert [p.name for p in prom.parent.iterdir()] == ["regfsck.prom"]  # no temp file left
    assert prom.stat().st_mode & 0o777 == 0o644  # node_exporter runs as another user


def test_corrupt_blob_shows_in_metrics_with_exit_1(fixture_root: Path, tmp_path: Path) -> None:
    blobs = sorted((fixture_root / V2 / "blobs").rglob("data"), key=lambda p: p.stat().st_size)
    victim = blobs[-1]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    prom = tmp_path / "m.prom"
    result = cli("verify", str(fixture_root), "--metrics-file", str(prom))
    assert result.returncode == 1
    found = samples(prom.read_text())
    assert value(found, "regfsck_verify_exit_status") == 1
    assert value(found, "regfsck_verify_findings", kind="blob_digest_mismatch", severity="error") == 1
    assert value(found, "regfsck_verify_findings_by_severity", severity="error") >= 1
    assert value(found, "regfsck_verify_complete") == 1  # complete, and it found damage


def test_unknown_repo_still_writes_the_failure(fixture_root: Path, tmp_path: Path) -> None:
    prom = tmp_path / "m.prom"
    result = cli("verify", str(fixture_root), "--repo", "no/such", "--metrics-file", str(prom))
    assert result.returncode == 2
    found = samples(prom.read_text())
    assert value(found, "regfsck_verify_exit_status") == 2
    assert value(found, "regfsck_verify_complete") == 0


def test_missing_directory_is_a_usage_error_before_the_run(fixture_root: Path, tmp_path: Path) -> None:
    result = cli("verify", str(fixture_root), "--metrics-file", str(tmp_path / "nope" / "m.prom"))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "does not exist" in result.stderr
    assert result.stdout == ""


def test_failed_write_is_one_line_and_leaves_the_old_file(fixture_root: Path, tmp_path: Path) -> None:
    """An immutable directory (chattr +i) refuses even root: the write fails for real."""
    textfile = tmp_path / "textfile"
    textfile.mkdir()
    prom = textfile / "regfsck.prom"
    prom.write_text("# previous run\n")
    if subprocess.run(["chattr", "+i", str(textfile)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available on this file system (cannot make a write fail)")
    try:
        result = cli("verify", str(fixture_root), "--metrics-file", str(prom))
        listing = sorted(p.name for p in textfile.iterdir())
    finally:
        subprocess.run(["chattr", "-i", str(textfile)], check=True)
    assert result.returncode == 3, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("regfsck: ")]
    assert len(errors) == 1, result.stderr  # one line (after verify's next steps, notes)
    assert errors[0].startswith("regfsck: cannot write metrics file") and "Traceback" not in result.stderr
    assert listing == ["regfsck.prom"]
    assert prom.read_text() == "# previous run\n"


def test_write_failing_midway_leaves_no_partial_file(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills up after some bytes were written: neither a partial file nor a temp."""
    prom = tmp_path / "regfsck.prom"
    prom.write_bytes(b"old\n")

    def full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.fsync", full)  # report.write_atomically, which metrics uses
    with pytest.raises(metrics.MetricsWriteError, match="No space left on device"):
        write_atomically(prom, b"new metrics\n" * 1000)
    assert [p.name for p in tmp_path.iterdir()] == ["regfsck.prom"]
    assert prom.read_bytes() == b"old\n"


def _facts(code: int) -> RunFacts:
    now = datetime.now(UTC)
    return RunFacts(root="/srv/reg \"x\"\n", started=now - timedelta(seconds=5), finished=now,
                    exit_status=code)


def test_stopped_at_the_time_limit_is_not_complete() -> None:
    summary = VerifySummary(blobs_verified=3, blobs_deferred=7, bytes_deferred=70,
                            stopped_at_limit=True)
    found = samples(verify_metrics(VerifyReport([], summary), _facts(0)).decode())
    assert value(found, "regfsck_verify_complete") == 0
    assert value(found, "regfsck_verify_blobs_deferred") == 7
    assert value(found, "regfsck_verify_duration_seconds") == 5
    assert dict(next(iter(found))[1])["root"] == "/srv/reg \"x\"\n"  # label escaping round-trips


def test_run_that_could_not_start_has_status_and_no_counts() -> None:
    found = samples(verify_metrics(None, _facts(3)).decode())
    assert value(found, "regfsck_verify_exit_status") == 3
    assert value(found, "regfsck_verify_complete") == 0
    assert not [n for n, _ in found if n.startswith("regfsck_verify_blobs")]
