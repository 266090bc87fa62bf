"""Mutation fuzzing: random damage to a tree the real registry wrote, then `verify` and `scan`.

A hypothesis state machine applies damage step by step to a private copy of the session's
real sample tree: random bytes or nothing in link files, truncated and deleted blobs, files
turned into directories and back, symlinks (loops, out of ROOT, to /dev/zero), FIFOs and
device nodes named `data` or `link`, unreadable files and directories, non-UTF-8 and very
long names, paths longer than PATH_MAX, huge or deeply nested manifests, manifests that
list themselves or each other. After the damage (and at random points in between) it runs
the CLI as an operator would, in subprocesses with a timeout, and requires of each run:

* it ends in bounded time (a blocking open of a FIFO or a read of /dev/zero would not);
* `verify` exits 0 or 1 (1 exactly when it reports errors), `scan` exits 0;
* `--json` is one strict JSON object (UTF-8, no lone surrogates), no traceback;
* nothing outside ROOT is opened (inotify on a decoy directory the symlinks point into);
* nothing in the tree changed.

Seeded (derandomized) and bounded: REGFSCK_FUZZ_EXAMPLES (default 15) sequences of at most
8 steps; REGFSCK_FUZZ_RANDOM=1 explores new examples instead of the fixed ones.
"""

from __future__ import annotations

from pathlib import Path

from hypothesis.stateful import run_state_machine_as_test

from tests.hostile import (
    can_mknod,
    unprivileged_prefix,
)
from tests.realtools import SampleInfo
from tests.support.damage import DamageMachine, fuzz_settings


def test_verify_and_scan_survive_random_damage(real_sample: tuple[Path, SampleInfo],
                                              tmp_path: Path) -> None:
    prefix = unprivileged_prefix()
    DamageMachine.sample, DamageMachine.info = real_sample
    DamageMachine.prefix = prefix if prefix is not None else []
    DamageMachine.mknod_ok = can_mknod(tmp_path)
    run_state_machine_as_test(DamageMachine, settings=fuzz_settings())
