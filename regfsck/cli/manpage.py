"""`python -m regfsck.cli.manpage > regfsck.1`: the man page, generated from the help.

Each command's section is its `--help` text exactly (so the page cannot drift from the
CLI), set as preformatted roff between a NAME/SYNOPSIS header and the exit codes.
`man -l regfsck.1` shows it; a test renders it with groff and checks every command and
option is there.
"""

from __future__ import annotations

import sys
from typing import Any

from regfsck import __version__
from regfsck.errors import ExitCode

EXIT_CODES = (
    (ExitCode.OK, "nothing wrong (verify), the plan or the change succeeded"),
    (ExitCode.FINDINGS, "findings: verify found errors, a blob is missing or damaged"),
    (ExitCode.USAGE, "usage error: a bad option, REF or digest (one line on stderr)"),
    (ExitCode.CANNOT_RUN, "cannot run: ROOT unreadable or not a registry, a registry uses it, "
                           "another regfsck holds the lock"),
    (ExitCode.INTERRUPTED, "interrupted (Ctrl-C); what was done is kept and undoable"),
)


def _roff(text: str) -> str:
    """Text safe inside a roff `.nf` block."""
    out = []
    for line in text.replace("\\", "\\e").splitlines():
        line = line.replace("-", "\\-")
        out.append("\\&" + line if line.startswith((".", "'")) else line)
    return "\n".join(out)


def _help(command: Any, name: str, parent: Any) -> str:
    import typer.core

    click: Any = getattr(typer.core, "_click", None) or __import__("click")
    ctx = click.Context(command, info_name=name, parent=parent, terminal_width=78,
                        max_content_width=78)
    return str(command.get_help(ctx))


def render() -> str:
    """The whole page as roff."""
    import typer.core
    import typer.main

    from regfsck.cli.app import COMMAND_MODULES, app

    click: Any = getattr(typer.core, "_click", None) or __import__("click")
    group = typer.main.get_command(app)
    root_ctx = click.Context(group, info_name="regfsck", terminal_width=78, max_content_width=78)
    lines = [
        f'.TH REGFSCK 1 "" "regfsck {__version__}" "User Commands"',
        ".SH NAME",
        "regfsck \\- offline fsck, garbage collector, exporter and repair tool for the storage "
        "of a Docker/OCI distribution registry",
        ".SH SYNOPSIS",
        ".B regfsck",
        "[\\-q] [\\-v] [\\-\\-no\\-color] COMMAND [OPTIONS] [ROOT] [ARGS]...",
        ".SH DESCRIPTION",
        ".nf",
        _roff(str(group.get_help(root_ctx))),
        ".fi",
        ".SH COMMANDS",
    ]
    commands = group.commands if hasattr(group, "commands") else {}
    for name in COMMAND_MODULES:
        command = commands.get(name)
        if command is None:
            continue
        subcommands = getattr(command, "commands", None)
        if subcommands:  # a group (`regfsck report merge`): each of its commands
            group_ctx = click.Context(command, info_name=name, parent=root_ctx)
            for sub_name, sub in sorted(subcommands.items()):
                lines += [f".SS regfsck {name} {sub_name}", ".nf",
                          _roff(_help(sub, sub_name, group_ctx)), ".fi"]
            continue
        lines += [f".SS regfsck {name}", ".nf", _roff(_help(command, name, root_ctx)), ".fi"]
    lines += [".SH EXIT STATUS"]
    for code, meaning in EXIT_CODES:
        lines += [".TP", f".B {code}", meaning]
    lines += [".SH ENVIRONMENT", ".TP", ".B NO_COLOR", "any value: no colour, bold or dim.",
              ".TP", ".B REGFSCK_DEBUG", "set: a traceback instead of the one-line internal error.",
              ".SH SEE ALSO", "README.md and docs/ in the regfsck sources."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
