"""Incremental verify benchmark: what a nightly `--changed-only` run costs next to a full one.

On one synthetic tree (default about 300k files) it times, in this order:

1. `verify --json` (full re-hash, no record: the baseline);
2. `verify --json --changed-only` on a tree without a record (hashes all, writes the record);
3. `verify --json --changed-only` again (nothing changed: hashes nothing);
4. the same after 1% of the blobs were touched (their stat changed);
5. `verify --json --changed-only --sample 4` (plus the rotating 4% slice);
6. `verify --json --no-data` (the structural floor every run pays).

Steps 1, 3, 5 and 6 are repeated --rounds times, interleaved (the record is restored before
each repetition so every run sees the same state); the table shows medians, blobs hashed
and peak RSS.

    python benchmarks/bench_incremental.py --files 300000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import measure
import synth
from measure import Run, log

RECORD = Path("regfsck-state") / "verify.sqlite"


def verify(root: Path, *args: str) -> tuple[Run, dict[str, Any]]:
    run = measure.run(measure.regfsck_cmd("verify", str(root), "--json", *args), capture=True)
    summary = json.loads(run.stdout)["summary"] if run.stdout else {}
    return run, summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=300_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", help="where to write the tree (default: a temp dir)")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--root", help="time this existing tree instead (its record is replaced)")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="regfsck-bench-incremental-"))
    workdir.mkdir(parents=True, exist_ok=True)
    root = Path(args.root) if args.root else workdir / f"incremental-{args.files}"
    if not root.exists():
        config = synth.SynthConfig.for_files(args.files)
        log(f"generating {config.repositories} repositories in {root}")
        synth.generate(root, config, jobs=measure.cpu_count())
    (root / RECORD).unlink(missing_ok=True)
    rows: list[tuple[str, list[Run], dict[str, Any]]] = []

    def step(name: str, *flags: str, repeat: int = 1, keep_record: bool = True) -> None:
        saved = (root / RECORD).read_bytes() if (root / RECORD).exists() else None
        runs = []
        summary: dict[str, Any] = {}
        for _ in range(repeat):
            if saved is not None:
                (root / RECORD).write_bytes(saved)
            run, summary = verify(root, *flags)
            runs.append(run)
            log(f"  {name}: {run.wall:.2f}s {run.max_rss_kb / 1024:.0f} MB, "
                f"hashed {summary.get('blobs_verified')}, skipped {summary.get('blobs_skipped')}")
        if not keep_record and saved is not None:
            (root / RECORD).write_bytes(saved)
        rows.append((name, runs, summary))

    measure.run(["find", str(root), "-type", "f"])  # warm up
    step("full verify (no record)", repeat=args.rounds)
    step("--changed-only, first run (creates the record)", "--changed-only")
    step("--changed-only, nothing changed", "--changed-only", repeat=args.rounds)
    blobs = sorted((root / synth.V2 / "blobs").glob("sha256/*/*/data"))
    for path in blobs[:: 100]:
        os.utime(path)  # 1% of the blobs get a new mtime
    step("--changed-only, 1% touched", "--changed-only", keep_record=False)
    step("--changed-only --sample 4", "--changed-only", "--sample", "4", repeat=args.rounds,
         keep_record=False)
    step("--no-data", "--no-data", repeat=args.rounds)
    print(f"\n{len(blobs)} blobs; medians of the repeated steps")
    print(f"{'step':<48} {'wall':>8} {'hashed':>8} {'MB hashed':>10} {'peak RSS':>9}")
    for name, runs, summary in rows:
        wall = sorted(r.wall for r in runs)[len(runs) // 2]
        print(f"{name:<48} {wall:>7.2f}s {summary.get('blobs_verified', 0):>8} "
              f"{summary.get('bytes_verified', 0) / 1e6:>10.1f} "
              f"{max(r.max_rss_kb for r in runs) / 1024:>6.0f} MB")
    if args.root:
        shutil.rmtree(root / RECORD.parent, ignore_errors=True)
    if not args.keep and not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
