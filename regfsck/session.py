"""The mutation session: the one way into changing a registry tree or its quarantine.

Every command that changes the tree (gc, rm, import, repair, undo) opens one, and so does
`purge`, which changes only the quarantine:

    with mutation_session(root, command="gc") as session:
        run = Run.begin(session, details)   # or session.begin(details)

Opening it, in this order: refuse while anything may use ROOT (`safety.mutation_guard`,
which also takes the root lock, so no other regfsck can start), then settle the runs a
crash left open (`quarantine.recover`), handing their messages to `on_recovered` at once
and keeping them in `session.recovered` for the command's report. Only inside an open
session can a journaled `Run` begin (`Run.begin` takes the session and refuses anything
else), so no code path can change the tree without the lock and without recovery first:
the guarantee lives in one place instead of in each command (issue 14, item 2). The
quarantine's own entry points take the session too: `quarantine.recover` (under the lock),
`quarantine.undo` (in an open tree session) and `quarantine.purge` (in any open session).

`purge` opens a quarantine session (`tree=False`): the registry never reads the quarantine,
so it may keep running; only the lock is taken, nothing is recovered (recovery changes the
tree) and no `Run` can begin in it.

An error that ends a tree session leaves it carrying the root (`RegfsckError.changing`)
and, for an I/O error, `midway`: the CLI's one handler says that what was changed so far
is kept, and how to free room when the disk is full.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from regfsck.errors import RegfsckError
from regfsck.quarantine import OnCrash, Run, recover
from regfsck.safety import RootLock, check_unused, mutation_guard
from regfsck.storage import MutableStorage, StorageError, UnsafePathError, mutable_storage

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from regfsck.root import RegistryRoot


class MutationSession:
    """The root lock held for one command, after recovery; what `Run.begin` requires.

    Built only by `mutation_session`; `active` is true from when the lock is held and
    recovery is done until the `with` block ends. `tree` is false for a session that may
    change only the quarantine (purge)."""

    def __init__(self, root: RegistryRoot, command: str, lock: RootLock,
                 storage: MutableStorage, *, tree: bool = True) -> None:
        self.root = root
        self.command = command
        self.lock = lock
        self.storage = storage
        self.tree = tree
        self.recovered: list[str] = []  # what recovery did, a message a run
        self.reverted_by_recovery: list[str] = []  # the runs recovery reverted
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
                     on_recovered: Callable[[list[str]], None] | None = None,
                     tree: bool = True) -> Iterator[MutationSession]:
    """Hold the root lock (refusing while anything may use ROOT), after crash recovery.

    A refusal changes nothing (SafetyError / LockHeldError, not even the lock file is
    made); recovery problems are QuarantineError. `on_recovered` gets the recovery
    messages (possibly none) as soon as they exist, before the command goes on: they are
    the operator's only news of what an interrupted run became, even if the command then
    fails. With `tree=False` (purge) only the lock is taken: see the module docstring."""
    try:
        storage = mutable_storage(root)  # a backend that cannot change yet refuses before the lock
        guard: AbstractContextManager[RootLock] = (
            mutation_guard(root, command) if tree else RootLock(root, command))
        with guard as lock:
            session = MutationSession(root, command, lock, storage, tree=tree)
            if tree:
                recovery = recover(session)
                session.recovered = recovery.messages
                session.reverted_by_recovery = recovery.reverted
                if on_recovered is not None:
                    on_recovered(session.recovered)
            session.active = True
            try:
                yield session
            finally:
                session.active = False
                storage.close()  # its descriptors now, not when (if ever) it is collected
    except RegfsckError as exc:
        if tree:
            exc.changing = root
            exc.midway = isinstance(exc, StorageError | UnsafePathError)
        raise
