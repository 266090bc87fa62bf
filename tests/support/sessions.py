"""The quarantine's entry points for tests that hold a root, not a session.

`quarantine.undo`, `purge` and `recover` take a mutation session (regfsck.session: the one
way into changing a tree); these open the session a command would open, and call them."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from regfsck import quarantine
from regfsck.root import RegistryRoot
from regfsck.session import mutation_session


def undo(root: RegistryRoot, run_id: str | None = None) -> quarantine.UndoResult:
    """`regfsck undo`'s core: recovery first, then the undo, under the lock."""
    with mutation_session(root, command="undo") as session:
        return quarantine.undo(session, run_id)


def purge(root: RegistryRoot, older_than: timedelta, **options: Any) -> quarantine.PurgeResult:
    """`regfsck purge`'s core: a quarantine session (only the lock)."""
    with mutation_session(root, command="purge", tree=False) as session:
        return quarantine.purge(session, older_than, **options)


def recover(root: RegistryRoot) -> list[str]:
    """What recovering the runs a crash left open says (a session, changing nothing else)."""
    with mutation_session(root, command="recover") as session:
        return session.recovered
