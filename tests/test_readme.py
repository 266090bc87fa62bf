"""The README documents what the code does: finding kinds and commands."""

from __future__ import annotations

from pathlib import Path

from regfsck.cli.app import app
from regfsck.findings import catalog_markdown

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_finding_table_matches_catalog() -> None:
    assert catalog_markdown() in README, "regenerate the table: python -m regfsck.findings"


def test_every_command_is_documented_with_an_example() -> None:
    names = [c.name or (c.callback.__name__ if c.callback else "") for c in app.registered_commands]
    assert names
    for name in names:
        assert f"### `regfsck {name}" in README, f"README has no section for {name}"
        assert f"regfsck {name} " in README.split(f"### `regfsck {name}", 1)[1]


def test_every_command_group_is_documented_with_an_example() -> None:
    """`regfsck report merge`: a command of a group (typer's registered_groups)."""
    groups = [(g.name, g.typer_instance) for g in app.registered_groups]
    assert groups
    for group, sub in groups:
        assert sub is not None
        for command in sub.registered_commands:
            name = f"{group} {command.name}"
            assert f"### `regfsck {name}" in README, f"README has no section for {name}"
            assert f"regfsck {name} " in README.split(f"### `regfsck {name}", 1)[1]
