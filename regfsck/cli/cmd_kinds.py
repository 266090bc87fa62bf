"""`regfsck kinds`: every finding kind verify can report, with its whole policy.

The catalogue (`regfsck.findings.CATALOG`) is what every command asks: the default
severity, the severity under `verify --strict`, whether the finding makes gc refuse, how
repair deals with it and what an operator can do. Listing it lets a script or a person
look a kind up without reading the code.
"""

from __future__ import annotations

import typer

from regfsck.cli.app import command
from regfsck.cli.common import JSON_OPTION, print_json, table
from regfsck.errors import ExitCode


@command()
def kinds(json_output: bool = JSON_OPTION) -> None:
    """List the finding kinds with their policy: severity (and under --strict), whether gc
    refuses, how repair deals with them, and what to do."""
    from regfsck.findings import CATALOG

    if json_output:
        print_json({"kinds": [{"kind": str(kind), **info.to_json()}
                              for kind, info in CATALOG.items()]})
        raise typer.Exit(ExitCode.OK)
    table("Finding kinds", ("kind", "severity", "--strict", "blocks gc", "repair", "meaning",
                            "what to do"),
          [(str(kind), str(info.severity), str(info.strict or info.severity),
            str(info.blocks_gc), str(info.repair), info.summary, info.advice)
           for kind, info in CATALOG.items()], limit=None)
    raise typer.Exit(ExitCode.OK)
