"""`verify --metrics-file`: the command-line side (check the target early, scan once for
verify and gc's outlook, write the file at the end, whatever the outcome)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from regfsck.cli.common import fail
from regfsck.errors import ExitCode

if TYPE_CHECKING:  # the verify engine loads when verify runs, not at start-up
    from regfsck.inventory import Inventory
    from regfsck.root import RegistryRoot
    from regfsck.storage import Storage
    from regfsck.verify import VerifyReport

METRICS_FILE_OPTION = typer.Option(
    None, "--metrics-file", metavar="PATH", help="Also write Prometheus text-format metrics "
    "of this run to PATH (atomically), e.g. into node_exporter's textfile directory.",
    show_default=False)


class MetricsRun:
    """One verify run seen by monitoring: started when created, written by `finish`."""

    def __init__(self, path: Path, registry: RegistryRoot, repos: list[str]) -> None:
        if not path.parent.is_dir():
            fail(f"--metrics-file: directory {path.parent} does not exist", ExitCode.USAGE)
        if path.is_dir():
            fail(f"--metrics-file: {path} is a directory", ExitCode.USAGE)
        self.path = path
        self.registry = registry
        self.repos = tuple(repos)
        self.started = datetime.now(UTC)
        self.inventory: Inventory | None = None
        self.storage: Storage | None = None

    def scan(self, jobs: int | None = None) -> Inventory:
        """The scan verify runs on, kept (with its storage: a bucket is listed once) to plan
        gc afterwards without scanning twice. Only the tree may be remote: the metrics file
        is always a local file."""
        from regfsck.scanner import Scanner
        from regfsck.storage import open_storage
        self.storage = open_storage(self.registry, jobs=jobs)
        self.inventory = Scanner(self.storage, self.registry).scan()
        return self.inventory

    def finish(self, report: VerifyReport | None, code: int) -> int:
        """Write the metrics; returns the exit code (a failed write is one line on stderr,
        and exit 3 unless the run already exits non-zero: its own code says more)."""
        from regfsck.findings import safe_text
        from regfsck.metrics import MetricsWriteError, RunFacts, gc_outlook, verify_metrics, write_atomically
        facts = RunFacts(root=safe_text(self.registry.display), started=self.started,
                         finished=datetime.now(UTC), exit_status=code, repos=self.repos)
        outlook = None
        if report is not None and self.inventory is not None and self.storage is not None:
            outlook = gc_outlook(self.inventory, self.storage,
                                 facts.finished, None if self.repos else report.findings)
        try:
            write_atomically(self.path, verify_metrics(report, facts, outlook))
        except MetricsWriteError as exc:
            fail(str(exc), code or ExitCode.CANNOT_RUN)
        return code
