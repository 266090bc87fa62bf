"""Where gc's plan holds its memory: tracemalloc over the walk and the plan, by source line.

Runs what `regfsck gc ROOT --grace 0` runs (the walk with its worker processes, then the
plan) in this process under tracemalloc, and prints the Python memory traced (now and the
peak) after the workers' results are taken, after the walk's merge and after the plan,
then the lines holding the most at the end. Only this process is traced (the workers'
memory is their own); the modules are imported before tracing starts, so the figures
are what grows with the tree, the part `bench_gc_plan.py` reports as RSS per file.

    python benchmarks/mem_profile.py /work/bench-trees/tree-100000 [--top 30]
"""

from __future__ import annotations

import argparse
import sys
import tracemalloc
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from regfsck import gc as gc_module
from regfsck import scanpool
from regfsck.graph import ManifestStore
from regfsck.root import RegistryRoot
from regfsck.scanner import Depth, Scanner
from regfsck.storage import open_storage


def traced(label: str, files: int) -> None:
    now, peak = tracemalloc.get_traced_memory()
    print(f"{label:28} now {now / 1e6:7.1f} MB ({now / 1024 / files:.3f} KiB/file), "
          f"peak since the last line {peak / 1e6:7.1f} MB ({peak / 1024 / files:.3f} KiB/file)")
    tracemalloc.reset_peak()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", type=Path, help="storage root (holding docker/registry/v2)")
    parser.add_argument("--top", type=int, default=25, help="lines to list")
    args = parser.parse_args()
    root = RegistryRoot(args.root, args.root / "docker/registry/v2")
    files = sum(1 for p in root.v2.rglob("*") if p.is_file()) or 1
    print(f"{files} files")
    run_in_processes = scanpool.run_in_processes

    def measured(*a: Any, **kw: Any) -> Any:
        result = run_in_processes(*a, **kw)
        traced("workers' results taken", files)
        return result

    scanpool.run_in_processes = measured  # type: ignore[assignment]
    tracemalloc.start(1)
    storage = open_storage(root)
    inv = Scanner(storage, root, depth=Depth.LIST, tag_history=False).scan()  # as `gc`
    traced("walk merged", files)
    store = ManifestStore(storage, inv)
    plan = gc_module.plan_from_inventory(inv, store, storage,
                                         gc_module.GcOptions(grace=timedelta(0)),
                                         now=datetime.now(UTC))
    traced("plan made", files)
    print(f"plan: {len(plan.blobs)} blobs, {len(plan.manifests)} manifests\n")
    for stat in tracemalloc.take_snapshot().statistics("lineno")[:args.top]:
        frame = stat.traceback[0]
        print(f"{stat.size / 1e6:8.2f} MB {stat.count:9d}  {frame.filename}:{frame.lineno}")


if __name__ == "__main__":
    main()
