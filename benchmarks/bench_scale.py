"""Scale benchmark: `regfsck gc` (dry run) and `regfsck verify --no-data` on big trees.

For each size (default 100k, 300k and 1M files) it writes a synthetic tree (benchmarks/
synth.py), then times, interleaved round after round on the same warm tree:

* `find ROOT -type f`                                  (the walk floor)
* `docker-registry garbage-collect --dry-run CONFIG`   (the official collector, 2.8)
* `regfsck gc ROOT --json --grace 0`                    (our plan; grace 0: the tree is new)
* `regfsck verify --no-data ROOT --json`                (every structural check)

and prints medians, ratios (official / gc, gc / find, verify / find), peak RSS, and how time
and memory grow with the file count. Before timing, it checks that the official collector
accepts the tree and that its blob set equals the generator's and regfsck gc's plan.

    python benchmarks/bench_scale.py                       # 100k, 300k, 1M (about 40 min)
    python benchmarks/bench_scale.py --sizes 100000 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import measure
import synth
from measure import Series, log

GC_AVAILABLE = (measure.REPO_ROOT / "regfsck" / "cli" / "cmd_gc.py").exists()


def gc_plan_blobs(stdout: bytes) -> set[str]:
    doc = json.loads(stdout)
    return {b["digest"] for b in doc["blobs"]}


def check_agreement(root: Path, config: Path, result: synth.SynthResult) -> dict[str, object]:
    """The official collector accepts the tree and agrees with the generator and regfsck."""
    official = measure.run([measure.REGISTRY_BIN, "garbage-collect", "--dry-run", str(config)],
                           capture=True)
    if official.returncode != 0:
        raise SystemExit(f"official garbage-collect failed on the synthetic tree (rc "
                         f"{official.returncode})")
    official_blobs = measure.official_gc_blobs(official.stdout)
    agreement: dict[str, object] = {
        "official_blobs": len(official_blobs),
        "official_equals_generator": official_blobs == result.unreferenced,
    }
    if GC_AVAILABLE:
        ours = measure.run(measure.regfsck_cmd("gc", str(root), "--json", "--grace", "0"),
                           capture=True)
        ours_blobs = gc_plan_blobs(ours.stdout) if ours.stdout else set()
        agreement["regfsck_gc_blobs"] = len(ours_blobs)
        agreement["regfsck_gc_equals_official"] = ours_blobs == official_blobs
    return agreement


def bench_size(target: int, workdir: Path, rounds: int, jobs: int, keep: bool,
               reuse: bool) -> dict[str, object]:
    root, result = measure.synthetic_tree(target, workdir, reuse=reuse, jobs=jobs)
    files = measure.count_files(root)
    log(f"   {files} files, {result.dirs} dirs, {result.bytes / 1e6:.0f} MB, "
        f"written in {result.seconds:.0f}s")
    reg_config = measure.registry_config(workdir / f"config-{target}.yml", root)
    measure.run(["find", str(root), "-type", "f"])  # warm the dentry and inode caches
    agreement = check_agreement(root, reg_config, result)
    log(f"   agreement: {agreement}")
    commands = {
        "find": lambda: measure.run(["find", str(root), "-type", "f"]),
        "official_gc": lambda: measure.run(
            [measure.REGISTRY_BIN, "garbage-collect", "--dry-run", str(reg_config)]),
        "verify_no_data": lambda: measure.run(
            measure.regfsck_cmd("verify", "--no-data", str(root), "--json")),
    }
    if GC_AVAILABLE:
        commands["regfsck_gc"] = lambda: measure.run(
            measure.regfsck_cmd("gc", str(root), "--json", "--grace", "0"))
    series = measure.interleaved(commands, rounds, log)
    if not keep:
        started = time.perf_counter()
        shutil.rmtree(root)
        log(f"   removed the tree in {time.perf_counter() - started:.0f}s")
    return {"target": target, "files": files, "dirs": result.dirs, "bytes": result.bytes,
            "repositories": len(result.repositories), "manifests": result.manifests,
            "agreement": agreement, "series": {k: v.to_json() for k, v in series.items()},
            "_series": series}


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "-"


def report(results: list[dict[str, object]]) -> None:
    names = ["find", "official_gc", "regfsck_gc", "verify_no_data"]
    print("\nwall time, median of rounds (peak RSS)")
    print(f"{'files':>9} " + " ".join(f"{n:>22}" for n in names))
    for res in results:
        series: dict[str, Series] = res["_series"]  # type: ignore[assignment]
        cells = []
        for n in names:
            s = series.get(n)
            cells.append(f"{s.median:8.2f}s ({s.rss_mb:6.0f} MB)" if s else f"{'-':>22}")
        print(f"{res['files']:>9} " + " ".join(f"{c:>22}" for c in cells))
    print("\nratios (same run, medians)")
    print(f"{'files':>9} {'official/gc':>12} {'gc/find':>9} {'official/find':>14} "
          f"{'verify/find':>12} {'official/verify':>16}")
    for res in results:
        s: dict[str, Series] = res["_series"]  # type: ignore[no-redef]
        gc = s.get("regfsck_gc")
        print(f"{res['files']:>9} {ratio(s['official_gc'].median, gc.median) if gc else '-':>12} "
              f"{ratio(gc.median, s['find'].median) if gc else '-':>9} "
              f"{ratio(s['official_gc'].median, s['find'].median):>14} "
              f"{ratio(s['verify_no_data'].median, s['find'].median):>12} "
              f"{ratio(s['official_gc'].median, s['verify_no_data'].median):>16}")
    if len(results) > 1:
        first, last = results[0], results[-1]
        growth = int(last["files"]) / int(first["files"])  # type: ignore[call-overload]
        print(f"\ngrowth from {first['files']} to {last['files']} files (x{growth:.1f} files)")
        for n in names:
            a = first["_series"].get(n)  # type: ignore[attr-defined]
            b = last["_series"].get(n)  # type: ignore[attr-defined]
            if a and b:
                print(f"  {n:>15}: time x{b.median / a.median:.1f}, peak RSS x{b.rss_mb / a.rss_mb:.1f}"
                      f"  ({a.median / int(first['files']) * 1e6:.1f} -> "  # type: ignore[call-overload]
                      f"{b.median / int(last['files']) * 1e6:.1f} us/file)")  # type: ignore[call-overload]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="100000,300000,1000000",
                        help="comma-separated file counts (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", help="where to write the trees (default: a temp dir)")
    parser.add_argument("--jobs", type=int, default=measure.cpu_count(), help="generator processes")
    parser.add_argument("--keep", action="store_true", help="keep the generated trees")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse trees a --keep run left in --workdir (implies --keep)")
    parser.add_argument("--json", dest="json_out", help="also write the figures to this file")
    args = parser.parse_args(argv)
    if not measure.have(measure.REGISTRY_BIN):
        raise SystemExit("docker-registry is not installed: nothing to compare against")
    if not GC_AVAILABLE:
        log("note: regfsck gc is not available yet; timing verify --no-data and the scan only")
    sizes = [int(s) for s in args.sizes.split(",")]
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="regfsck-bench-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        for size in sizes:
            results.append(bench_size(size, workdir, args.rounds, args.jobs, args.keep or args.reuse,
                                      args.reuse))
    finally:
        if not (args.keep or args.reuse) and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    report(results)
    measure.write_results(args.json_out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
