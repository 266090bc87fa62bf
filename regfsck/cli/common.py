"""Pieces every command shares: root arguments, output settings, JSON, consoles, errors.

Everything here is cheap to import (no rich, no engine): `regfsck --help` and the start of
every command pay only for typer. Consoles and tables load rich when something is printed.

Nothing read from the disk, a config, an import source or the command line is ever handed
to rich as markup: consoles are created with `markup=False`, styles come from `Text` objects
(`styled`), and names go through `safe_text` (control characters and undecodable bytes as
`\\xNN`) so that neither `[red]` in a path nor an escape sequence in a tag reaches a terminal
as anything but the characters it is.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any, NoReturn

import typer

from regfsck.errors import ExitCode
from regfsck.findings import safe_text

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import ProgressColumn
    from rich.text import Text

    from regfsck.root import RegistryRoot

ROOT_HELP = ("Registry storage root (holding docker/registry/v2), the v2 directory itself, or "
             "s3://BUCKET/PREFIX. Default: /var/lib/registry, or the root "
             "named by --config.")
ROOT_ARGUMENT = typer.Argument(None, metavar="ROOT", help=ROOT_HELP, show_default=False)


def root_then(what: str, help_text: str) -> Any:
    """The `ROOT WHAT` arguments of a command that reads one thing from the tree (split by
    `split_root`): ROOT's help, then `help_text` on WHAT."""
    return typer.Argument(..., metavar=f"ROOT {what}", show_default=False,
                          help=f"{ROOT_HELP} Then {help_text} Omit ROOT with --config.")
CONFIG_OPTION = typer.Option(
    None, "--config", "-c", metavar="CONFIG.YML", help="Read the root directory (or the s3 "
    "bucket) from the registry's config.yml (honours REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY "
    "and REGISTRY_STORAGE_S3_*); then omit ROOT.", show_default=False)
JSON_OPTION = typer.Option(False, "--json", help="Print one JSON object on stdout (errors too: "
                           '{"error": ..., "exit_code": ...}).')
APPLY_OPTION = typer.Option(False, "--apply", help="Really do it (default: print the plan).")
JOBS_OPTION = typer.Option(0, "--jobs", "-j", metavar="N", show_default=False,
                           help="Hashing threads (default: the number of CPUs).")
REGISTRY_URL_OPTION = typer.Option(
    None, "--registry-url", metavar="URL", show_default=False,
    help="Object storage: a registry serving this bucket (repeat for each), asked before and "
    "during the change whether it is stopped or in read-only maintenance mode; --apply "
    "refuses otherwise.")
NO_REGISTRY_CHECK_OPTION = typer.Option(
    False, "--no-registry-check", help="Object storage: change the bucket without asking any "
    "registry. RISK: a push while regfsck runs can lose its blobs (see docs/s3.md).")
BREAK_LOCK_OPTION = typer.Option(
    False, "--break-lock", help="Object storage: take over a lock left by a regfsck run that "
    "died (not refreshed for 5 minutes); a live run's lock is never broken.")


@dataclass
class Settings:
    """How this run prints: set from the global flags before a command runs."""

    quiet: bool = False  # -q: results only; no notes, hints, next steps or progress
    verbose: bool = False  # -v: every row (no truncated tables), more detail
    no_color: bool = False  # --no-color or NO_COLOR: no colour and no bold/dim either
    json: bool = False  # --json: errors are JSON on stdout too


SETTINGS = Settings()


def plain_style() -> bool:
    """No ANSI styling at all: --no-color, or NO_COLOR set to anything (no-color.org)."""
    return SETTINGS.no_color or bool(os.environ.get("NO_COLOR"))


def stdout_is_terminal() -> bool:
    return sys.stdout.isatty()


def shown(text: str) -> str:
    """A name from the disk, printable: undecodable bytes and control characters as `\\xNN`.
    (Consoles never interpret markup, so `[` needs no escaping.)"""
    return safe_text(text)


class Styled(str):
    """Text with a rich style, never parsed as markup; plain text wherever styles are off
    (a pipe, --no-color, NO_COLOR), which then costs no rich import at all."""

    style: str

    def __new__(cls, text: str, style: str) -> Styled:
        made = super().__new__(cls, safe_text(text))
        made.style = style
        return made


def styled(text: str, style: str) -> Styled:
    """`text` (never markup) in `style`."""
    return Styled(text, style)


def rich_text(*parts: str) -> Text:
    """Rich Text of `parts` (Styled parts keep their style)."""
    from rich.text import Text

    return Text.assemble(*((p, p.style) if isinstance(p, Styled) else safe_text(p) for p in parts))


def _console(stderr: bool) -> Console:
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    tty = stream.isatty()
    # In a pipe nothing is wrapped or cropped: a line is as long as what it says.
    return Console(stderr=stderr, highlight=False, markup=False, emoji=False,
                   soft_wrap=not tty, width=None if tty else 1 << 16,
                   color_system=None if plain_style() else "auto")


def stdout_console() -> Console:
    """Results on stdout. In a pipe lines are never wrapped (grep finds whole digests)."""
    return _console(stderr=False)


def stderr_console() -> Console:
    return _console(stderr=True)


def _emit(stderr: bool, parts: tuple[str, ...]) -> None:
    stream = sys.stderr if stderr else sys.stdout
    if stream.isatty() and not plain_style():
        _console(stderr).print(rich_text(*parts))
        return
    stream.write("".join(safe_text(p) for p in parts) + "\n")
    stream.flush()


def note(*parts: str) -> None:
    """A note, hint or next step on stderr; -q and --json silence it."""
    if not (SETTINGS.quiet or SETTINGS.json):
        _emit(True, parts)


def warn(*parts: str) -> None:
    """A warning on stderr: shown even with -q (not with --json, whose output says it)."""
    if not SETTINGS.json:
        _emit(True, parts)


def alert(*parts: str) -> None:
    """A line on stderr in every mode (--json and -q too): why the run ends as it does, such
    as an interruption. Stdout keeps its one JSON document; a script reading only the exit
    code still leaves the operator a word on the terminal or in the log."""
    _emit(True, parts)


def say(*parts: str) -> None:
    """A line of results on stdout."""
    _emit(False, parts)


_FULL_DIGEST = re.compile(r"\b(sha256|sha512):([0-9a-f]{12})[0-9a-f]{52,116}\b")


def short_ids(text: str) -> str:
    """Full digests as `sha256:` plus 12 hex digits, as docker and git show ids on a screen
    (the commands that take a digest accept the short form)."""
    return _FULL_DIGEST.sub(r"\1:\2", text)




def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]], *,
          right: Sequence[str] = (), limit: int | None = 200, more_hint: str = "") -> None:
    """Rows for people on a terminal, rows for grep in a pipe.

    On a terminal: a rich table, full digests shortened to 12 hex digits, at most `limit`
    rows (-v: all). Piped: the title, a `#` header line and one tab-separated line per row
    with full digests and paths, never wrapped and never truncated."""
    if not stdout_is_terminal():
        out = sys.stdout
        out.write(f"{safe_text(title)}:\n# " + "\t".join(columns) + "\n")
        for row in rows:
            out.write("\t".join(safe_text(c).replace("\t", " ") for c in row) + "\n")
        out.flush()
        return
    from rich.table import Table

    shown_rows = rows if SETTINGS.verbose or limit is None else rows[:limit]
    grid = Table(title=safe_text(title))
    for column in columns:
        grid.add_column(column, justify="right" if column in right else "left",
                        overflow="fold")
    for row in shown_rows:
        grid.add_row(*(rich_text(Styled(short_ids(c), c.style) if isinstance(c, Styled)
                                 else short_ids(c)) for c in row))
    console = stdout_console()
    console.print(grid)
    if len(shown_rows) < len(rows):
        console.print(f"... and {len(rows) - len(shown_rows)} more (-v or a pipe lists all"
                      f"{more_hint})")


def fail(message: str, code: int = ExitCode.CANNOT_RUN) -> NoReturn:
    """Print a one-line error on stderr (never wrapped, scripts grep it) and exit; with
    --json also `{"error": ..., "exit_code": ...}` on stdout.

    Names in the message may come from the disk or an import source: control characters
    (NUL, escape sequences) and undecodable bytes are shown as `\\xNN`, never sent raw."""
    line = safe_text(" ".join(message.split()))
    if SETTINGS.json:
        print_json({"error": line, "exit_code": code})
    sys.stderr.write(f"regfsck: {line}\n")
    sys.stderr.flush()
    raise typer.Exit(code)


OBJECT_STORAGE_COMMANDS = ("scan, verify, gc, rm, repair, runs, undo, purge, export, import, inspect "
                           "and why")


def for_changes(registry: RegistryRoot, registry_urls: list[str] | None = None,
                no_registry_check: bool = False, break_lock: bool = False) -> RegistryRoot:
    """ROOT with what a changing command was told about object storage (--registry-url,
    --no-registry-check, --break-lock): `safety` asks the registries and takes the lock
    by these. On a local tree regfsck sees the processes itself: the options are refused."""
    import dataclasses

    given = [name for name, value in (("--registry-url", registry_urls),
                                      ("--no-registry-check", no_registry_check),
                                      ("--break-lock", break_lock)) if value]
    if not registry.is_object_storage:
        if given:
            fail(f"{given[0]} is for trees in object storage; on a local tree regfsck looks "
                 "at the processes using it itself", ExitCode.USAGE)
        return registry
    if registry_urls and no_registry_check:
        fail("give either --registry-url or --no-registry-check, not both", ExitCode.USAGE)
    return dataclasses.replace(registry, registry_urls=tuple(registry_urls or ()),
                               registry_check=not no_registry_check, break_lock=break_lock)


def changes_tested_on(registry: RegistryRoot, command: str, providers: tuple[str, ...],
                      apply: bool) -> None:
    """Refuse `command --apply` on an object store its writes have not been proven on
    against the real registry's driver there (plans only read: they run everywhere). An
    untried write path is not offered with the only copy of someone's images."""
    if apply and registry.s3 is not None and registry.s3.provider not in providers:
        fail(f"{command} --apply is not available on {registry.s3.provider}:// yet (its writes "
             f"are tested on {', '.join(p + '://' for p in providers)} only); the plan runs "
             "without --apply")


def open_root(root: Path | None, config: Path | None, *,
              object_storage: bool = False) -> RegistryRoot:
    """Resolve ROOT/--config (RootError: exit 3 with what was expected, one line).

    A tree in object storage is accepted only by the commands that pass `object_storage`;
    the others refuse it before reading anything."""
    from regfsck.root import resolve

    registry = resolve(root, config)
    if registry.is_object_storage and not object_storage:
        fail(f"{registry.display} is in object storage, where regfsck runs only "
             f"{OBJECT_STORAGE_COMMANDS} so far")
    return registry


def with_requests(registry: RegistryRoot, doc: dict[str, Any]) -> dict[str, Any]:
    """Object storage bills per request: --json documents say how many were made, by kind."""
    if not registry.is_object_storage:
        return doc
    from regfsck.objectstore import request_counts

    return {**doc, "requests": request_counts()}


def split_root(args: list[str], config: Path | None, what: str) -> tuple[Path | None, str]:
    """`ROOT THING` (or just `THING` with --config)."""
    if config is not None:
        if len(args) != 1:
            fail(f"with --config give only the {what}", ExitCode.USAGE)
        return None, args[0]
    if len(args) != 2:
        fail(f"give ROOT and the {what}" if len(args) < 2 else f"give only ROOT and the {what}",
             ExitCode.USAGE)
    return Path(args[0]), args[1]


def root_words(registry: RegistryRoot) -> str:
    """ROOT as a shell word, for the command lines regfsck suggests."""
    import shlex

    return shlex.quote(safe_text(registry.display))


def _strict_text(text: str) -> str:
    """Names read from disk may hold undecodable bytes (lone surrogates after os.fsdecode),
    which strict JSON parsers reject: show those bytes as `\\xNN`, as findings do."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that no file name produced
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def json_safe(data: Any) -> Any:
    """`data` with every string (keys included) valid UTF-8, so any JSON parser accepts it."""
    if isinstance(data, str):
        return _strict_text(data)
    if isinstance(data, dict):
        return {json_safe(k): json_safe(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [json_safe(v) for v in data]
    return data


def print_json(data: Any) -> None:
    """Write `data` as indented JSON, streamed in ~1 MiB pieces: a large answer (`why` on a
    chain of thousands of nested indexes lists millions of digests) is never held as one
    string next to the data it is made of."""
    encoder = json.JSONEncoder(indent=2, sort_keys=False, ensure_ascii=True)
    pieces: list[str] = []
    size = 0
    for piece in encoder.iterencode(json_safe(data)):
        pieces.append(piece)
        size += len(piece)
        if size >= 1 << 20:
            sys.stdout.write("".join(pieces))
            pieces.clear()
            size = 0
    sys.stdout.write("".join(pieces) + "\n")
    sys.stdout.flush()


def json_bytes(data: Any) -> bytes:
    """`data` as print_json prints it, for a file (`--output`)."""
    return (json.dumps(json_safe(data), indent=2, ensure_ascii=True) + "\n").encode("ascii")


class CtrlC:
    """Ctrl-C as a request to stop at the engine's next safe point.

    While installed, SIGINT sets `stop` (which the engine polls between blobs, batches or
    files) instead of raising KeyboardInterrupt wherever it lands, such as between a journal
    write and its rename. `restore()`, or leaving the `with` block, puts the previous handler
    back. `now=False` defers `install()` (a sweep installs it once its run starts). With
    `notice`, the first Ctrl-C also prints it on stderr and a second one raises
    KeyboardInterrupt: stop at once (verify, whose hashing can take hours)."""

    def __init__(self, notice: str | None = None, *, now: bool = True) -> None:
        self.stop = threading.Event()
        self._notice = notice
        self._previous: Any = None
        if now:
            self.install()

    def install(self) -> None:
        if self._previous is None:
            self._previous = signal.signal(signal.SIGINT, self._interrupted)

    def _interrupted(self, signum: int, frame: FrameType | None) -> None:
        if self._notice is not None and self.stop.is_set():
            raise KeyboardInterrupt
        self.stop.set()
        if self._notice is not None:
            os.write(2, f"regfsck: {self._notice}\n".encode())

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def __enter__(self) -> threading.Event:
        return self.stop

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.restore()


def default_jobs() -> int:
    return max(1, os.cpu_count() or 1)


def human_bytes(n: int) -> str:
    """IEC units (KiB, MiB, GiB), the one unit system of every output and progress bar."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def plural(n: int, word: str, words: str | None = None) -> str:
    """`1 blob`, `2 blobs` (`words` for irregular plurals)."""
    return f"{n} {word if n == 1 else (words or word + 's')}"


def show_progress(json_output: bool) -> bool:
    """Progress bars only for people: a terminal on stderr, no --json and no -q."""
    return not json_output and not SETTINGS.quiet and sys.stderr.isatty()


def byte_columns() -> list[ProgressColumn]:
    """Bar, bytes done/total, rate and time left, in IEC units like every summary."""
    from rich.progress import BarColumn, DownloadColumn, ProgressColumn, Task, TimeRemainingColumn
    from rich.text import Text

    class _Rate(ProgressColumn):
        def render(self, task: Task) -> Text:
            speed = task.finished_speed or task.speed
            return Text("?" if speed is None else f"{human_bytes(int(speed))}/s")

    return [BarColumn(), DownloadColumn(binary_units=True), _Rate(), TimeRemainingColumn()]


class ByteBar:
    """A transient bytes / rate / ETA bar on stderr (IEC units): hashing, the deep layer pass
    and export all show their progress with this one bar. `advance` may be called from
    several worker threads at once."""

    def __init__(self, label: str) -> None:
        import threading

        from rich.progress import Progress, TextColumn

        self.progress = Progress(TextColumn(label), *byte_columns(),
                                 console=stderr_console(), transient=True)
        self.task = self.progress.add_task(label, total=0)
        self._lock = threading.Lock()

    def start(self, total_bytes: int, total_items: int = 0) -> None:
        self.progress.update(self.task, total=total_bytes)
        self.progress.start()

    def advance(self, nbytes: int) -> None:
        with self._lock:
            self.progress.advance(self.task, nbytes)

    def finish(self) -> None:
        self.progress.stop()
