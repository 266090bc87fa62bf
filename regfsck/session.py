"""The mutation session: the one way into changing a registry tree.

Every command that changes the tree (gc, rm, import, repair, undo) opens one:

    with mutation_session(root, command="gc") as session:
        run = Run.begin(session, details)   # or session.begin(details)

Opening it, in this order: refuse while anything may use ROOT (`safety.mutation_guard`,
which also takes the root lock, so no other regfsck can start), then settle the runs a
crash left open (`quarantine.recover`), handing their messages to `on_recovered` at once
and keeping them in `session.recovered` for the command's report. Only inside an open
session can a journaled `Run` begin (`Run.begin` takes the session and refuses anything
else), so no code path can change the tree without the lock and without recovery first:
the guarantee lives in one place instead of in each command (issue 14, item 2).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from regfsck.quarantine import OnCrash, Run, recover
from regfsck.safety import check_unused, mutation_guard
from regfsck.storage import MutableStorage, mutable_storage

if TYPE_CHECKING:
    from regfsck.root import RegistryRoot
    from regfsck.safety import RootLock


class MutationSession:
    """The root lock held for one command, after recovery; what `Run.begin` requires.

    Built only by `mutation_session`; `active` is true from when the lock is held and
    recovery is done until the `with` block ends."""

    def __init__(self, root: RegistryRoot, command: str, lock: RootLock,
                 storage: MutableStorage) -> None:
        self.root = root
        self.command = command
        self.lock = lock
        self.storage = storage
        self.recovered: list[str] = []
        self.active = False

    def check_unused(self) -> None:
        """Ask again whether the tree may change now (between batches of a long run):
        SafetyError when a registry or other process started using ROOT meanwhile."""
        check_unused(self.root)

    def begin(self, details: dict[str, Any], *, on_crash: OnCrash = "revert",
              command: str | None = None) -> Run:
        """A journaled run of this session's command (see `quarantine.Run.begin`)."""
        return Run.begin(self, details, on_crash=on_crash, command=command)


@contextmanager
def mutation_session(root: RegistryRoot, *, command: str,
                     on_recovered: Callable[[list[str]], None] | None = None
                     ) -> Iterator[MutationSession]:
    """Hold the root lock (refusing while anything may use ROOT), after crash recovery.

    A refusal changes nothing (SafetyError / LockHeldError, not even the lock file is
    made); recovery problems are QuarantineError. `on_recovered` gets the recovery
    messages (possibly none) as soon as they exist, before the command goes on: they are
    the operator's only news of what an interrupted run became, even if the command then
    fails."""
    storage = mutable_storage(root)  # a backend that cannot change yet refuses before the lock
    with mutation_guard(root, command) as lock:
        session = MutationSession(root, command, lock, storage)
        session.recovered = recover(root)
        if on_recovered is not None:
            on_recovered(session.recovered)
        session.active = True
        try:
            yield session
        finally:
            session.active = False
