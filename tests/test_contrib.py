"""contrib/: the systemd service + timer and the Kubernetes CronJob for the nightly verify.

Each is checked as far as this machine allows: the units by `systemd-analyze verify` (and
the timer's calendar by `systemd-analyze calendar`), the CronJob by parsing it and checking
its fields; and in both, the regfsck command line they run is run for real (paths mapped to
a copy of the fixture and a temp dir), so a flag that does not exist fails here."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support import REPO_ROOT
from tests.support.cli import run

SYSTEMD = REPO_ROOT / "contrib" / "systemd"
CRONJOB = REPO_ROOT / "contrib" / "kubernetes" / "regfsck-verify-cronjob.yaml"
NIGHTLY = ["--changed-only", "--sample", "5", "--max-duration", "2h", "--metrics-file"]


def unit_values(path: Path) -> dict[str, list[str]]:
    """`Key=value` lines of a unit file, every value of repeated keys kept in order."""
    values: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            values.setdefault(key.strip(), []).append(value.strip())
    return values


def run_verify_line(args: list[str],
                    mapping: dict[str, Path]) -> tuple[subprocess.CompletedProcess[str], Path]:
    """Run `regfsck ARGS` with container/host paths replaced; returns the metrics file too."""
    mapped = []
    for arg in args:
        for old, new in mapping.items():
            if arg == old or arg.startswith(old + "/"):
                arg = str(new) + arg[len(old):]
        mapped.append(arg)
    metrics = Path(mapped[mapped.index("--metrics-file") + 1])
    result = run(*mapped)
    return result, metrics


def check_metrics(path: Path) -> None:
    values = {s.name: s.value for f in text_string_to_metric_families(path.read_text())
              for s in f.samples}
    assert values["regfsck_verify_exit_status"] == 0
    assert values["regfsck_verify_complete"] == 1
    assert values["regfsck_verify_blobs_verified"] > 0


def test_service_runs_the_nightly_verify(fixture_root: Path, tmp_path: Path) -> None:
    service = unit_values(SYSTEMD / "regfsck-verify.service")
    (exec_start,) = service["ExecStart"]
    argv = shlex.split(exec_start)
    assert argv[0] == "/usr/local/bin/regfsck" and argv[1] == "verify"
    root = argv[2]
    metrics_dir = str(Path(argv[argv.index("--metrics-file") + 1]).parent)
    assert argv[3:-1] == NIGHTLY
    writable = {p.lstrip("-") for line in service["ReadWritePaths"] for p in line.split()}
    assert writable == {f"{root}/regfsck-state", metrics_dir}  # nothing else of the tree
    assert service["ProtectSystem"] == ["strict"]
    assert service["RequiresMountsFor"] == [root]
    textfile = tmp_path / "textfile"
    textfile.mkdir()
    result, metrics = run_verify_line(argv[1:], {root: fixture_root, metrics_dir: textfile})
    assert result.returncode == 0, result.stderr
    check_metrics(metrics)
    assert (fixture_root / "regfsck-state" / "verify.sqlite").is_file()  # the record it keeps


def test_timer_is_nightly_and_persistent() -> None:
    timer = unit_values(SYSTEMD / "regfsck-verify.timer")
    assert timer["Persistent"] == ["true"]
    assert timer["WantedBy"] == ["timers.target"]
    (calendar,) = timer["OnCalendar"]
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    result = subprocess.run(["systemd-analyze", "calendar", calendar], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert re.search(r"Normalized form: \*-\*-\* 02:30:00", result.stdout), result.stdout


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed (Debian package systemd)")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """systemd-analyze checks every key and that ExecStart's program exists and runs: the
    copy points it at this machine's regfsck (the unit ships with /usr/local/bin/regfsck)."""
    regfsck = shutil.which("regfsck") or sys.executable
    for unit in ("regfsck-verify.service", "regfsck-verify.timer"):
        text = (SYSTEMD / unit).read_text().replace("/usr/local/bin/regfsck", regfsck)
        (tmp_path / unit).write_text(text)
    result = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "regfsck-verify.service"),
                             str(tmp_path / "regfsck-verify.timer")],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "SYSTEMD_LOG_LEVEL": "warning"})
    ours = [line for line in (result.stdout + result.stderr).splitlines() if "regfsck-verify" in line]
    assert result.returncode == 0 and not ours, result.stdout + result.stderr


def test_kubernetes_cronjob(fixture_root: Path, tmp_path: Path) -> None:
    doc = yaml.safe_load(CRONJOB.read_text())
    assert doc["apiVersion"] == "batch/v1" and doc["kind"] == "CronJob"
    spec = doc["spec"]
    assert len(spec["schedule"].split()) == 5
    assert spec["concurrencyPolicy"] == "Forbid"  # two verifies of one tree never overlap
    job = spec["jobTemplate"]["spec"]
    assert job["activeDeadlineSeconds"] > 2 * 3600  # longer than --max-duration 2h
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    (container,) = pod["containers"]
    args = container["args"]
    assert all(isinstance(a, str) for a in args), "quote numbers: args must be strings"
    assert args[0] == "verify" and args[2:-1] == NIGHTLY
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert set(mounts.values()) <= set(volumes)
    root, metrics_dir = args[1], str(Path(args[-1]).parent)
    assert "persistentVolumeClaim" in volumes[mounts[root]]
    assert metrics_dir in mounts
    if container["securityContext"].get("readOnlyRootFilesystem"):
        assert "/tmp" in mounts
    textfile = tmp_path / "textfile"
    textfile.mkdir()
    result, metrics = run_verify_line(args, {root: fixture_root, metrics_dir: textfile})
    assert result.returncode == 0, result.stderr
    check_metrics(metrics)
