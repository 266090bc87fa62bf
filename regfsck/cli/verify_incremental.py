"""verify's incremental options (`--changed-only`, `--max-age`, `--sample`, `--max-duration`):
argument checking and the lines they add to the human report."""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Any

import typer

from regfsck.cli.common import fail, human_bytes, plural, say, warn
from regfsck.durations import format_duration, parse_duration
from regfsck.errors import ExitCode

if TYPE_CHECKING:
    from regfsck.verify import VerifySummary

DEFAULT_MAX_AGE = timedelta(days=30)  # regfsck.incremental.DEFAULT_MAX_AGE (a test keeps them equal)

CHANGED_ONLY_OPTION = typer.Option(
    False, "--changed-only", help="Re-hash only blobs that are new, whose stat changed, or "
    "whose last good verdict is older than --max-age (uses ROOT/regfsck-state/verify.sqlite).")
MAX_AGE_OPTION = typer.Option(
    None, "--max-age", metavar="DUR", help="With --changed-only: re-hash blobs last verified "
    f"longer ago than this (default {format_duration(DEFAULT_MAX_AGE)}).", show_default=False)
SAMPLE_OPTION = typer.Option(
    None, "--sample", metavar="PERCENT", help="Also re-hash the stalest PERCENT of the stored "
    "bytes; repeated runs rotate through the whole store (catches bit rot).", show_default=False)
MAX_DURATION_OPTION = typer.Option(
    None, "--max-duration", metavar="DUR", help="Stop hashing cleanly this long after the start; "
    "what was verified is recorded and the next run resumes.", show_default=False)


def _positive_duration(text: str, option: str) -> timedelta:
    value = parse_duration(text, option)
    if value <= timedelta(0):
        fail(f"{option} must be longer than 0", ExitCode.USAGE)
    return value


def incremental_options(*, no_data: bool, changed_only: bool, max_age: str | None,
                        sample: float | None, max_duration: str | None) -> dict[str, Any]:
    """VerifyOptions fields for these flags, or a usage error (exit 2) saying what is wrong."""
    if no_data and (changed_only or sample is not None or max_duration is not None):
        fail("--changed-only, --sample and --max-duration choose which blobs to re-hash: "
             "they cannot be used with --no-data", ExitCode.USAGE)
    if max_age is not None and not changed_only:
        fail("--max-age applies to --changed-only; add --changed-only", ExitCode.USAGE)
    if sample is not None and not 0 < sample <= 100:
        fail("--sample must be a percentage above 0 and at most 100", ExitCode.USAGE)
    options: dict[str, Any] = {"changed_only": changed_only, "sample_percent": sample}
    if max_age is not None:
        options["max_age"] = _positive_duration(max_age, "--max-age")
    if max_duration is not None:
        options["max_duration"] = _positive_duration(max_duration, "--max-duration")
    return options


def render_incremental(summary: VerifySummary) -> None:
    """What the record let this run skip, and what is left for the next one."""
    if summary.blobs_skipped:
        say(f"{plural(summary.blobs_skipped, 'blob')} ({human_bytes(summary.bytes_skipped)}) not "
            "re-hashed: unchanged since their last good verdict")
    if summary.hashed_because and summary.hashed_because.keys() != {"all"}:
        reasons = ", ".join(f"{n} {why}" for why, n in sorted(summary.hashed_because.items()))
        say(f"chosen for re-hashing: {reasons}")
    if summary.stopped_at_limit:
        say(f"stopped at the --max-duration limit: {plural(summary.blobs_deferred, 'blob')} "
            f"({human_bytes(summary.bytes_deferred)}) left for the next run")
    if summary.record_error:
        warn(f"warning: verification record not updated: {summary.record_error}")
