"""The typer application; every `cmd_*` module in this package adds its command."""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys

import typer

from regfsck import __version__, exitcodes

app = typer.Typer(
    name="regfsck",
    help="Check, clean and move the data directory of a stopped Docker/OCI registry.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"regfsck {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """regfsck: fsck, gc, export and repair for registry:2 data directories, offline."""


def _load_commands() -> None:
    package = sys.modules[__package__ or "regfsck.cli"]
    names = sorted(m.name for m in pkgutil.iter_modules(package.__path__)
                   if m.name.startswith("cmd_"))
    for name in names:
        importlib.import_module(f"{package.__name__}.{name}")


_load_commands()


def main() -> None:
    """Console entry point: never a traceback unless REGFSCK_DEBUG is set."""
    try:
        app()
    except KeyboardInterrupt:
        sys.stderr.write("regfsck: interrupted\n")
        sys.exit(exitcodes.INTERRUPTED)
    except SystemExit:
        raise
    except Exception as exc:  # last resort: one line, exit 3
        if os.environ.get("REGFSCK_DEBUG"):
            raise
        sys.stderr.write(f"regfsck: internal error: {type(exc).__name__}: {exc}\n"
                         "(set REGFSCK_DEBUG=1 for a traceback)\n")
        sys.exit(exitcodes.CANNOT_RUN)
