"""Acting on a removal plan (gc's or rm's): move each victim into a quarantine run.

The plan was judged from a scan; between the scan and each move the tree could still
change, so every victim is re-checked just before its move: it must still exist with the
mtimes the plan saw (a push in flight would change them) and be older than the grace.
Before each phase and each batch the caller may revalidate its judgement (gc re-marks
from a fresh scan before moving any blob, and before each batch compares the repositories
with that scan), and /proc is looked at again for a registry started meanwhile. Moves are
batched: one journal fsync per batch, every intent on disk before its move.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, Protocol, TypeVar

from regfsck.gc import GcOptions, GcPlan, plan_gc, revalidator
from regfsck.layout import V2_PREFIX
from regfsck.removal import Removal, Revalidate
from regfsck.rm import RmPlan, plan_rm
from regfsck.root import RegistryRoot
from regfsck.safety import SafetyError
from regfsck.session import MutationSession, mutation_session
from regfsck.storage import MutableStorage

# Order of the sweep: what refers to other things goes first, so a crash at any point
# leaves no link pointing at something already moved away that the link still needs.
PHASES = ("tags", "manifests", "repositories", "layer_links", "blobs", "uploads")
BATCH = 256
USERS_EVERY_S = 1.0  # between batches, /proc is looked at again at least this often
PAUSE_ENV = "REGFSCK_TEST_PAUSE_DIR"
PAUSE_LIMIT_S = 600.0


@dataclass
class SweepResult:
    run_id: str | None = None
    moved: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why)
    dirs_removed: list[str] = field(default_factory=list)
    interrupted: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "moved": len(self.moved),
                "skipped": [{"path": f"{V2_PREFIX}/{p}", "reason": r} for p, r in self.skipped],
                "dirs_removed": len(self.dirs_removed), "interrupted": self.interrupted}


def recheck(storage: MutableStorage, removal: Removal, cutoff_ns: int) -> str | None:
    """Why `removal` must not be moved now, or None when it still may (`storage` is rooted
    at ROOT, the removal's paths at v2).

    Its checks are the path itself or names below it: where there are any, the path is
    looked at only to word a missing one (one `lstat` less per move of a big gc)."""
    whole = f"{V2_PREFIX}/{removal.path}"
    checked = removal.checked()
    if not checked and storage.lstat_raw(whole) is None:
        return "gone since the scan"
    for path, seen_ns in checked:
        st = storage.lstat_raw(f"{V2_PREFIX}/{path}")
        if st is None:
            return ("gone since the scan" if storage.lstat_raw(whole) is None
                    else f"{path} changed since the scan")
        if st.st_mtime_ns != seen_ns:
            return f"{path} changed since the scan"
        if removal.grace_applies and st.st_mtime_ns > cutoff_ns:
            return "younger than the grace period"
    return None


def _pause(point: str) -> None:
    """Test hook: with REGFSCK_TEST_PAUSE_DIR set and a file `<point>.pause` in it, announce
    `point` (a file `<point>.reached`) and wait for `<point>.go`, so a test can act on the
    tree (start a registry, push) at an exact moment of a run in another process. Unset,
    it costs one environment lookup."""
    where = os.environ.get(PAUSE_ENV)
    if not where or not os.path.exists(os.path.join(where, f"{point}.pause")):
        return
    with open(os.path.join(where, f"{point}.reached"), "w", encoding="ascii"):
        pass
    go = os.path.join(where, f"{point}.go")
    deadline = time.monotonic() + PAUSE_LIMIT_S
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.02)


def sweep(session: MutationSession, details: dict[str, Any], removals: Sequence[Removal],
          empty_dirs: Sequence[str], *, grace: timedelta,
          revalidate: Revalidate | None = None, stop: threading.Event | None = None,
          on_progress: Callable[[int], None] | None = None,
          now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> SweepResult:
    """Quarantine `removals` phase by phase in one run, then the directories left empty.

    The run is the session's (`regfsck.session`: lock held, interrupted runs recovered).
    A stop request (Ctrl-C) ends the run cleanly
    between batches; everything moved so far stays undoable. Anything that starts using
    ROOT meanwhile (seen at each phase, between batches at least every USERS_EVERY_S and
    before the run ends) stops the run: SafetyError, with what was moved kept in the
    journaled run. `revalidate` is asked once per phase with all its items and again
    before each batch with the batch: gc compares the repositories with its fresh mark
    and keeps whatever a push since then may use."""
    result = SweepResult()
    if not removals and not empty_dirs:
        return result
    root = session.root
    storage = session.storage  # rooted at ROOT, as `recheck` expects
    with session.begin(details, on_crash="finish") as run:
        result.run_id = run.run_id
        last_check = 0.0

        def users_check() -> None:
            nonlocal last_check
            try:
                session.check_unused()
            except SafetyError as exc:
                raise SafetyError(
                    f"stopped after {len(result.moved)} of {len(removals)} moves: {exc}. What was "
                    f"moved is kept in run {run.run_id} (see `regfsck runs`; revert it with "
                    f"`regfsck undo {root.display} {run.run_id}` once nothing uses the tree)") from exc
            last_check = time.monotonic()

        for phase in PHASES:
            items = [r for r in removals if r.phase == phase]
            if not items:
                continue
            if stop is not None and stop.is_set():
                break
            _pause(phase)
            users_check()
            refused = revalidate(phase, items) if revalidate is not None else {}
            for number, start in enumerate(range(0, len(items), BATCH)):
                if stop is not None and stop.is_set():
                    break
                chunk = items[start:start + BATCH]
                _pause(f"{phase}.{number}")
                if time.monotonic() - last_check >= USERS_EVERY_S:
                    users_check()
                if revalidate is not None:
                    refused.update(revalidate(phase, chunk))
                cutoff_ns = int((now() - grace).timestamp() * 1_000_000_000)
                batch: list[str] = []
                for item in chunk:
                    why = refused.get(item.path) or recheck(storage, item, cutoff_ns)
                    if why is None:
                        batch.append(item.path)
                    else:
                        result.skipped.append((item.path, why))
                run.quarantine_batch(batch)
                result.moved.extend(batch)
                if on_progress is not None:
                    on_progress(len(chunk))
        result.interrupted = stop is not None and stop.is_set()
        if not result.interrupted:
            _pause("end")
            users_check()
            result.dirs_removed = run.remove_empty_dirs(empty_dirs)
        note = None
        if result.interrupted:
            note = f"stopped on request after {len(result.moved)} of {len(removals)} moves"
        run.finish(note)
    return result


class RemovalPlan(Protocol):
    """What gc's and rm's plans share: the paths to quarantine (a plan stays a plan: the
    outcome of carrying it out is `Applied`, which wraps it)."""

    @property
    def removal_list(self) -> list[Removal]: ...

    @property
    def empty_dirs(self) -> list[str]: ...

    @property
    def is_blocked(self) -> bool: ...

    def to_json(self) -> dict[str, Any]: ...


P = TypeVar("P", bound=RemovalPlan)


@dataclass(frozen=True)
class Applied(Generic[P]):
    """A plan made under the lock and carried out; `result` is None when the plan refused
    (`plan.is_blocked`: nothing was changed). The plan itself is left as it was planned."""

    plan: P
    recovered: list[str]
    result: SweepResult | None = None

    @property
    def interrupted(self) -> bool:
        return self.result is not None and self.result.interrupted

    @property
    def run_id(self) -> str | None:
        return self.result.run_id if self.result is not None else None

    @property
    def applied(self) -> bool:
        return self.run_id is not None

    def to_json(self) -> dict[str, Any]:
        """The plan's document with the outcome in its `applied`, `run_id` (and `apply`)."""
        return {**self.plan.to_json(), "applied": self.applied, "run_id": self.run_id,
                **({"apply": self.result.to_json()} if self.result is not None else {})}


def apply_removals(root: RegistryRoot, command: str, make_plan: Callable[[], P],
                   details: Callable[[P], dict[str, Any]], *, grace: timedelta,
                   revalidate: Callable[[P], Revalidate | None] = lambda plan: None,
                   stop: threading.Event | None = None,
                   on_recovered: Callable[[list[str]], None] | None = None,
                   on_start: Callable[[int], Callable[[int], None] | None] | None = None
                   ) -> Applied[P]:
    """The apply flow of gc and rm: open the mutation session, plan again under the lock
    (what a plan made before the lock saw may have changed), refuse a blocked plan, else
    sweep it and record the outcome in the plan.

    `on_start(total)` is called just before the sweep with the number of removals and may
    return the progress callback (a bar on a terminal)."""
    with mutation_session(root, command=command, on_recovered=on_recovered) as session:
        plan = make_plan()
        if plan.is_blocked:
            return Applied(plan, session.recovered)
        progress = on_start(len(plan.removal_list)) if on_start is not None else None
        result = sweep(session, details(plan), plan.removal_list, plan.empty_dirs, grace=grace,
                       revalidate=revalidate(plan), stop=stop, on_progress=progress)
    return Applied(plan, session.recovered, result)


# --------------------------------------------------------------------------- the two removal commands


def apply_gc(root: RegistryRoot, options: GcOptions, *, stop: threading.Event | None = None,
             on_recovered: Callable[[list[str]], None] | None = None,
             on_start: Callable[[int], Callable[[int], None] | None] | None = None
             ) -> Applied[GcPlan]:
    """`gc --apply`: plan under the root lock (after recovery), refuse a blocked plan, else
    move the victims into one journaled run, re-marking before each phase (`revalidator`)."""
    return apply_removals(root, "gc", lambda: plan_gc(root, options),
                          lambda plan: {"options": options.to_json()}, grace=options.grace,
                          revalidate=lambda plan: revalidator(root, plan), stop=stop,
                          on_recovered=on_recovered, on_start=on_start)


def apply_rm(root: RegistryRoot, refs: list[str], *, force: bool = False,
             stop: threading.Event | None = None,
             on_recovered: Callable[[list[str]], None] | None = None,
             on_start: Callable[[int], Callable[[int], None] | None] | None = None
             ) -> Applied[RmPlan]:
    """`rm --apply`: plan under the root lock (after recovery), refuse a blocked plan, else
    move what the REFs name into one journaled run (no grace: the operator named them)."""
    return apply_removals(root, "rm", lambda: plan_rm(root, refs, force=force),
                          lambda plan: {"refs": plan.refs, "force": force}, grace=timedelta(0),
                          stop=stop, on_recovered=on_recovered, on_start=on_start)
