"""Pieces every command shares: root arguments, JSON output, consoles, errors."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from regfsck import exitcodes
from regfsck.findings import safe_text
from regfsck.root import RegistryRoot, RootError, resolve

ROOT_ARGUMENT = typer.Argument(
    None, help="Registry storage root (holding docker/registry/v2), the v2 directory "
    "itself, or s3://BUCKET/PREFIX (scan, verify, gc). Default: /var/lib/registry.",
    show_default=False)
CONFIG_OPTION = typer.Option(
    None, "--config", "-c", help="Read the root directory (or the s3 bucket) from the "
    "registry's config.yml (honours REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY and "
    "REGISTRY_STORAGE_S3_*).", show_default=False)
JSON_OPTION = typer.Option(False, "--json", help="Print one JSON object on stdout.")
APPLY_OPTION = typer.Option(False, "--apply", help="Really do it (default: print the plan).")


def shown(text: str) -> str:
    """A name from the disk, ready for rich: undecodable bytes and control characters as
    `\\xNN`, and `[` escaped, so that a directory named `[/]` is never read as markup."""
    return escape(safe_text(text))


def stdout_console() -> Console:
    return Console(highlight=False, soft_wrap=False)


def stderr_console() -> Console:
    return Console(stderr=True, highlight=False)


def fail(message: str, code: int = exitcodes.CANNOT_RUN) -> NoReturn:
    """Print a one-line error on stderr (never wrapped, scripts grep it) and exit.

    Names in the message may come from the disk or an import source: control characters
    (NUL, escape sequences) and undecodable bytes are shown as `\\xNN`, never sent raw."""
    sys.stderr.write(f"regfsck: {safe_text(' '.join(message.split()))}\n")
    sys.stderr.flush()
    raise typer.Exit(code)


OBJECT_STORAGE_COMMANDS = "scan, verify and gc (plan)"


def open_root(root: Path | None, config: Path | None, *,
              object_storage: bool = False) -> RegistryRoot:
    """Resolve ROOT/--config or exit 3 with what was expected.

    A tree in object storage is accepted only by the commands that pass `object_storage`;
    the others refuse it before reading anything."""
    try:
        registry = resolve(root, config)
    except RootError as exc:
        fail(str(exc))
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


def default_jobs() -> int:
    return max(1, os.cpu_count() or 1)


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def show_progress(json_output: bool) -> bool:
    """Progress bars only for people: a terminal on stderr and no --json."""
    return not json_output and sys.stderr.isatty()
