"""`regfsck report merge`: the N reports of `verify --shard K/N` as one verify report."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from regfsck.cli.app import Command, Group, app
from regfsck.cli.common import JSON_OPTION, json_bytes, note, print_json

if TYPE_CHECKING:
    from regfsck.verify import VerifyReport

report_app = typer.Typer(name="report", cls=Group, no_args_is_help=True, rich_markup_mode=None,
                         help="Work with verify's JSON reports (merge the shards of one run).")
app.add_typer(report_app, name="report")


@report_app.command("merge", cls=Command)
def merge(
    reports: list[Path] = typer.Argument(..., metavar="REPORT...", show_default=False,
                                         help="The --json reports of `verify --shard K/N`, "
                                         "one per shard, in any order."),
    json_output: bool = JSON_OPTION,
    output: Path | None = typer.Option(
        None, "--output", "-o", metavar="PATH", help="Also write the merged JSON document to "
        "PATH (whole or not at all).", show_default=False),
    allow_changed_tree: bool = typer.Option(
        False, "--allow-changed-tree", help="Merge shards whose scans saw different trees (a "
        "push or gc between them); each structural finding is then as its owner saw it."),
) -> None:
    """Combine the reports of shards 0..N-1 of one `verify --shard K/N` run into the report
    an unsharded `verify --json` gives (same findings, counts and exit status); refuse a set
    with shards missing or repeated, of different N, trees, regfsck versions or options."""
    from regfsck.report import exit_code, load_report, merge, write_atomically

    loaded = [load_report(path) for path in reports]
    merged = merge(loaded, allow_changed_tree=allow_changed_tree)
    if output is not None:
        write_atomically(output, json_bytes(merged))
    if json_output:
        print_json(merged)
    else:
        from regfsck.cli.cmd_verify import next_steps, render_verify
        from regfsck.cli.verify_incremental import render_incremental

        report = _as_report(merged)
        render_verify(report)
        render_incremental(report.summary)
        if not report.summary.interrupted:
            for line in next_steps(report.findings, shlex.quote(str(loaded[0].shard["root"]))):
                note(line)
    raise typer.Exit(exit_code(merged))


def _as_report(doc: dict[str, Any]) -> VerifyReport:
    """The merged document as verify's result, for verify's own human rendering."""
    from regfsck.findings import Finding, Kind, Severity
    from regfsck.report import MergeError
    from regfsck.verify import VerifyReport, VerifySummary

    known = set(VerifySummary.__dataclass_fields__)
    summary = VerifySummary(**{k: v for k, v in doc["summary"].items() if k in known})
    try:
        findings = [Finding(kind=Kind(f["kind"]), severity=Severity(f["severity"]),
                            path=f["path"], message=f["message"], repo=f.get("repo"),
                            tag=f.get("tag"), digest=f.get("digest"),
                            affected_tags=tuple(f.get("affected_tags", ())))
                    for f in doc["findings"]]
    except (KeyError, ValueError, TypeError) as exc:  # another version's kinds, a hand edit
        raise MergeError(f"the reports hold findings this regfsck cannot show ({exc}); "
                         "--json merges them as they are") from None
    return VerifyReport(findings, summary)
