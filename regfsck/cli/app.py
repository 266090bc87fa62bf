"""The typer application; every `cmd_*` module in this package adds its command.

Start-up is kept to typer itself: the `cmd_*` modules declare their arguments only and
import their engine (scanner, gc, export, ...) inside the command, so `regfsck --help` or
`regfsck verify` loads nothing another command needs (benchmarks/bench_startup.py).

Help is plain text (no rich markup: a `[/VARIANT]` in a help string is text), with
conventional usage lines (`ROOT REF...`, `[ROOT]`) and metavars (`N`, `DUR`, `PATH`),
which `regfsck.cli.manpage` turns into a man page.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
import typer.core
from typer.core import TyperCommand, TyperGroup

from regfsck import __version__
from regfsck.cli.common import SETTINGS, fail, print_json
from regfsck.errors import ExitCode, RegfsckError

# typer >= 0.26 vendors click as typer._click; older ones use click itself.
_click: Any = getattr(typer.core, "_click", None) or __import__("click")

CommandFunction = TypeVar("CommandFunction", bound=Callable[..., None])

COMMAND_MODULES = ("scan", "verify", "report", "gc", "rm", "why", "inspect", "repair", "export",
                   "import", "runs", "undo", "purge", "kinds")

# Flags every command accepts, before or after its name: (spellings, setting, help).
GLOBAL_FLAGS = (
    (("-q", "--quiet"), "quiet", "Results only: no notes, hints, next steps or progress bars."),
    (("-v", "--verbose"), "verbose", "List every row (tables on a terminal stop at 200)."),
    (("--no-color",), "no_color", "No colour, bold or dim (as NO_COLOR=1)."),
)


def _take_global_flags(args: list[str]) -> list[str]:
    """Remove -q/-v/--no-color from `args` (up to `--`) into SETTINGS."""
    out: list[str] = []
    for i, arg in enumerate(args):
        if arg == "--":
            return out + args[i:]
        for spellings, setting, _ in GLOBAL_FLAGS:
            if arg in spellings:
                setattr(SETTINGS, setting, True)
                break
        else:
            out.append(arg)
    return out


def _type_metavar(param: Any) -> str:
    if param.metavar:
        return str(param.metavar)
    kind = str(getattr(param.type, "name", "") or param.display_type(None) or "")
    kind = kind.strip("<>").lower()
    return {"integer": "N", "int": "N", "float": "NUM", "path": "PATH"}.get(kind, "TEXT")


def _argument_name(param: Any) -> str:
    name = str(param.metavar or (param.name or "").upper())
    if param.nargs != 1 and not name.endswith("...") and " " not in name:
        name += "..."
    return name


def _default_text(param: Any) -> str:
    default = param.default
    if param.is_flag or callable(default) or default in (None, 0, "", [], ()) \
            or param.show_default is False:
        return ""
    return f"  [default: {default}]"


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """(element type, is a list) of `T`, `T | None`, `list[T]`, `list[T] | None`."""
    import types
    import typing

    args = typing.get_args(annotation)
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            return None, False
        annotation = rest[0]
        args = typing.get_args(annotation)
    if typing.get_origin(annotation) is list and len(args) == 1:
        return args[0], True
    return annotation, False


def _plain_coercion(param: Any) -> None:
    """Convert this parameter's value with int()/float()/Path() instead of typer's pydantic
    adapter: importing pydantic costs more than the rest of the start-up together, and
    regfsck's parameters are only str, int, float, Path, bool and lists of those. Any other
    annotation (or a typer without this hook) keeps typer's own conversion."""
    try:
        from typer._coercion import RuntimeParam
    except ImportError:
        return
    descriptor = getattr(param, "type_descriptor", None)
    if descriptor is None or getattr(descriptor, "file_annotation", None) is not None \
            or getattr(param, "_runtime_param", True) is not None:
        return
    base, _ = _unwrap(descriptor.annotation)
    if base not in (str, int, float, Path, bool):
        return
    param._runtime_param = _plain_param_class(RuntimeParam)(
        parameter_info=descriptor.parameter_info, annotation=descriptor.annotation)


_PLAIN: dict[type, Any] = {}


def _plain_param_class(base_class: type) -> Any:
    if base_class in _PLAIN:
        return _PLAIN[base_class]
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class PlainParam(base_class):  # type: ignore[misc]
        def _coerce_value(self, value: Any, param: Any, ctx: Any) -> Any:
            element, is_list = _unwrap(self.annotation)

            def one(item: Any) -> Any:
                if isinstance(item, element):
                    return item
                try:
                    return element(item)
                except (TypeError, ValueError):
                    label = {int: "an integer", float: "a number"}.get(element, element.__name__)
                    raise _click.exceptions.BadParameter(
                        f"{item!r} is not {label}.", ctx=ctx, param=param) from None

            if is_list:
                return [one(item) for item in value]
            return one(value)

    _PLAIN[base_class] = PlainParam
    return PlainParam


class _PlainParams:
    """What regfsck's commands and its group share: parameters converted by `_plain_coercion`."""

    def get_params(self, ctx: Any) -> list[Any]:
        params = list(super().get_params(ctx))  # type: ignore[misc]
        for param in params:
            _plain_coercion(param)
        return params


class Command(_PlainParams, TyperCommand):
    """A regfsck command: global flags, plain help, JSON usage errors under --json, and the
    one place a `RegfsckError` becomes output: one line on stderr (and the
    `{"error", "exit_code"}` document under --json), exit with the error's own code."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except RegfsckError as exc:
            if exc.changing is None:
                fail(str(exc), exc.exit_code)
            from regfsck.cli.sweeping import error_text

            fail(error_text(exc), exc.exit_code)

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = ["[OPTIONS]"]
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                name = _argument_name(param)
                pieces.append(name if param.required else f"[{name}]")
        return pieces

    def format_options(self, ctx: Any, formatter: Any) -> None:
        arguments: list[tuple[str, str]] = []
        options: list[tuple[str, str]] = []
        for param in self.get_params(ctx):
            help_text = getattr(param, "help", None) or ""
            if getattr(param, "hidden", False):
                continue
            if param.param_type_name == "argument":
                arguments.append((_argument_name(param), help_text))
                continue
            names = ", ".join(sorted(param.opts, key=len))
            if not param.is_flag:
                names += f" {_type_metavar(param)}"
            if param.multiple:
                help_text += " Repeatable."
            options.append((names, help_text + _default_text(param)))
        helps = [o for o in options if o[0].startswith("-h")]
        options = [o for o in options if o not in helps]
        options += [(", ".join(spellings), text) for spellings, _, text in GLOBAL_FLAGS] + helps
        if arguments:
            with formatter.section("Arguments"):
                formatter.write_dl(arguments)
        with formatter.section("Options"):
            formatter.write_dl(options)

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        args = _take_global_flags(args)
        if "--json" in args:
            SETTINGS.json = True
        try:
            return list(super().parse_args(ctx, args))
        except _click.exceptions.UsageError as exc:
            if not SETTINGS.json:
                raise
            print_json({"error": exc.format_message(), "exit_code": exc.exit_code})
            sys.stderr.write(f"regfsck: {exc.format_message()}\n")
            raise typer.Exit(exc.exit_code) from None


class Group(_PlainParams, TyperGroup):
    """Commands in the order an operator meets them, not alphabetical."""

    def list_commands(self, ctx: Any) -> list[str]:
        order = {name: i for i, name in enumerate(COMMAND_MODULES)}
        return sorted(super().list_commands(ctx), key=lambda n: order.get(n, len(order)))


app = typer.Typer(
    name="regfsck",
    cls=Group,
    help="Check, clean and move the data directory of a stopped Docker/OCI registry.",
    no_args_is_help=True,
    add_completion=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def command(name: str | None = None) -> Callable[[CommandFunction], CommandFunction]:
    """`app.command` with regfsck's Command class."""
    decorator: Callable[[CommandFunction], CommandFunction] = app.command(name, cls=Command)
    return decorator


def _version(value: bool) -> None:
    if value:
        typer.echo(f"regfsck {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Results only: no notes, hints, "
                               "next steps or progress bars."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="List every row and more "
                                 "detail."),
    no_color: bool = typer.Option(False, "--no-color", help="No colour, bold or dim (as "
                                  "NO_COLOR=1)."),
) -> None:
    """regfsck: fsck, gc, export and repair for registry:2 data directories, offline.

    Shell completion: `regfsck --install-completion` (bash, zsh, fish, PowerShell).
    A man page: `python -m regfsck.cli.manpage > regfsck.1`.
    """
    SETTINGS.quiet |= quiet
    SETTINGS.verbose |= verbose
    SETTINGS.no_color |= no_color


def _load_commands() -> None:
    for name in COMMAND_MODULES:
        __import__(f"regfsck.cli.cmd_{name}")


_load_commands()


def main() -> None:
    """Console entry point: never a traceback unless REGFSCK_DEBUG is set."""
    try:
        app(prog_name="regfsck")
    except KeyboardInterrupt:
        sys.stderr.write("regfsck: interrupted\n")
        sys.exit(ExitCode.INTERRUPTED)
    except SystemExit:
        raise
    except Exception as exc:  # last resort: one line, exit 3
        if os.environ.get("REGFSCK_DEBUG"):
            raise
        sys.stderr.write(f"regfsck: internal error: {type(exc).__name__}: {exc}\n"
                         "(set REGFSCK_DEBUG=1 for a traceback)\n")
        sys.exit(ExitCode.CANNOT_RUN)
