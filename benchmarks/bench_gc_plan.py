"""gc plan against the official collector, warm and cold, side by side (issue 15 targets 1-2).

For each size (default 100k, 300k and 1M files) it writes a synthetic tree (benchmarks/
synth.py) or reuses one, checks that the official collector, the generator and `regfsck gc`
agree on the blobs to delete, then times, alternating in one run, round after round:

* `docker-registry garbage-collect --dry-run CONFIG`   (the official collector, 2.8)
* `regfsck gc ROOT --grace 0`                          (the plan: defaults, no environment
                                                        tuning; grace 0 because the tree is new)
* with `--baseline DIR`: the same `regfsck gc` from another checkout (the code before)

each once with the page cache warm and once cold (`sync; echo 3 > /proc/sys/vm/drop_caches`
before the run: needs root). It prints medians, the ratio regfsck / official per mode (the
target is <= 0.5), peak RSS and RSS per file above a fixed base (the peak RSS of the same
command on a tree of a few hundred files), extrapolated to 10M files, and the load average.
Both checkouts are byte-compiled first, as installing them does (`measure.byte_compile`).

    python benchmarks/bench_gc_plan.py --workdir /work/bench-trees --keep
    python benchmarks/bench_gc_plan.py --workdir /work/bench-trees --reuse --sizes 300000 \\
        --rounds 3 --baseline /tmp/regfsck-before
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import measure
import synth
from measure import Run, Series, log

MODES = ("warm", "cold")


def loadavg() -> str:
    with open("/proc/loadavg") as fh:
        return " ".join(fh.read().split()[:3])


def regfsck_gc(root: Path, baseline: str | None, *extra: str) -> Callable[[], Run]:
    cmd = measure.regfsck_cmd("gc", str(root), "--grace", "0", *extra)
    if baseline:
        return lambda: measure.baseline_run(baseline, cmd, capture=bool(extra))
    return lambda: measure.run(cmd, capture=bool(extra))


def check_agreement(root: Path, config: Path, result: synth.SynthResult,
                    baseline: str | None) -> dict[str, object]:
    official = measure.run([measure.REGISTRY_BIN, "garbage-collect", "--dry-run", str(config)],
                           capture=True)
    if official.returncode != 0:
        raise SystemExit(f"official garbage-collect failed (rc {official.returncode})")
    official_blobs = measure.official_gc_blobs(official.stdout)
    ours = regfsck_gc(root, None, "--json")()
    ours_blobs = {b["digest"] for b in json.loads(ours.stdout)["blobs"]} if ours.stdout else set()
    agreement: dict[str, object] = {
        "official_blobs": len(official_blobs),
        "official_equals_generator": official_blobs == result.unreferenced,
        "regfsck_equals_official": ours_blobs == official_blobs,
        "regfsck_rc": ours.returncode,
    }
    if baseline:
        before = regfsck_gc(root, baseline, "--json")()
        plan_now = json.loads(ours.stdout)
        plan_before = json.loads(before.stdout)
        for plan in (plan_now, plan_before):
            plan.pop("run_id", None)
        agreement["plan_equals_baseline"] = plan_now == plan_before
    return agreement


def base_rss(workdir: Path, baseline: str | None) -> dict[str, float]:
    """Peak RSS (MB) of each regfsck on a tiny tree: the fixed part of its memory."""
    root = workdir / "tree-base"
    if not root.exists():
        synth.generate(root, synth.SynthConfig(repositories=5))
    out = {"regfsck": max(regfsck_gc(root, None)().max_rss_kb for _ in range(3)) / 1024}
    if baseline:
        out["baseline"] = max(regfsck_gc(root, baseline)().max_rss_kb for _ in range(3)) / 1024
    return out


def bench_size(target: int, args: argparse.Namespace, workdir: Path) -> dict[str, object]:
    root, result = measure.synthetic_tree(target, workdir, reuse=args.reuse)
    files = measure.count_files(root)
    config = measure.registry_config(workdir / f"config-{target}.yml", root)
    agreement = check_agreement(root, config, result, args.baseline)
    log(f"   {files} files; agreement: {agreement}")
    commands: dict[str, Callable[[], Run]] = {
        "official": lambda: measure.run(
            [measure.REGISTRY_BIN, "garbage-collect", "--dry-run", str(config)]),
        "regfsck": regfsck_gc(root, None),
    }
    if args.baseline:
        commands["before"] = regfsck_gc(root, args.baseline)
    series: dict[str, dict[str, Series]] = {m: {n: Series(n) for n in commands} for m in args.modes}
    loads = [loadavg()]
    names = list(commands)
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for mode in args.modes:
            for name in order:
                if mode == "cold":
                    measure.drop_caches()
                else:
                    commands[name]()  # the warm-up run: the metadata in the cache
                run = commands[name]()
                series[mode][name].runs.append(run)
                log(f"  round {r + 1}/{args.rounds} {mode:4} {name:8}: {run.wall:7.2f}s wall "
                    f"{run.cpu:6.2f}s cpu {run.max_rss_kb / 1024:6.0f} MB rc={run.returncode} "
                    f"(load {loadavg()})")
        loads.append(loadavg())
    if not (args.keep or args.reuse):
        shutil.rmtree(root)
    return {"target": target, "files": files, "agreement": agreement, "load": loads,
            "series": {m: {n: s.to_json() for n, s in ss.items()} for m, ss in series.items()},
            "_series": series}


def report(results: list[dict[str, object]], base: dict[str, float], modes: list[str]) -> None:
    print("\nwall time, median of rounds (CPU s; peak RSS); ratio = regfsck / official")
    for res in results:
        files = int(res["files"])  # type: ignore[call-overload]
        series: dict[str, dict[str, Series]] = res["_series"]  # type: ignore[assignment]
        print(f"\n{files} files (load average during the run: {' -> '.join(res['load'])})")  # type: ignore[arg-type]
        for mode in modes:
            ss = series[mode]
            official = ss["official"].median
            for name, s in ss.items():
                ratio = f"ratio {s.median / official:.2f}" if name != "official" else ""
                rss = s.rss_mb
                per_file = ""
                if name != "official":
                    fixed = base.get("baseline" if name == "before" else "regfsck", 0.0)
                    per_file = f"{(rss - fixed) * 1024 / files:.3f} KiB/file above {fixed:.0f} MB"
                walls = ", ".join(f"{r.wall:.2f}" for r in s.runs)
                cpu = statistics.median(r.cpu for r in s.runs)
                print(f"  {mode:4} {name:8} {s.median:8.2f}s ({cpu:6.2f}s cpu; {rss:5.0f} MB) "
                      f"{ratio:11} {per_file}  [{walls}]")
    if results:
        print("\npeak RSS per file above the base, extrapolated to 10M files")
        for res in results:
            files = int(res["files"])  # type: ignore[call-overload]
            series = res["_series"]  # type: ignore[assignment]
            for name in ("regfsck", "before"):
                runs = [r for mode in modes for r in series[mode].get(name, Series(name)).runs]
                if not runs:
                    continue
                fixed = base.get("baseline" if name == "before" else "regfsck", 0.0)
                rss = max(r.max_rss_kb for r in runs) / 1024
                kib = (rss - fixed) * 1024 / files
                print(f"  {files:>9} {name:8} {rss:6.0f} MB = {fixed:.0f} MB + {kib:.3f} KiB/file "
                      f"-> 10M files: {fixed + kib * 10_000_000 / 1024:,.0f} MB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="100000,300000,1000000")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--modes", default="warm,cold", help="warm, cold or both")
    parser.add_argument("--workdir", help="where the trees go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the generated trees")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse trees a --keep run left in --workdir (implies --keep)")
    parser.add_argument("--baseline", help="a checkout of the code before, timed alongside")
    parser.add_argument("--json", dest="json_out", help="also write the figures to this file")
    args = parser.parse_args(argv)
    args.modes = [m for m in args.modes.split(",") if m]
    if any(m not in MODES for m in args.modes):
        raise SystemExit(f"--modes: choose from {', '.join(MODES)}")
    if "cold" in args.modes and os.geteuid() != 0:
        raise SystemExit("cold runs drop the page cache: run as root (or --modes warm)")
    if not measure.have(measure.REGISTRY_BIN):
        raise SystemExit("docker-registry is not installed: nothing to compare against")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="regfsck-bench-gc-"))
    workdir.mkdir(parents=True, exist_ok=True)
    for checkout in filter(None, [measure.REPO_ROOT, args.baseline]):
        measure.byte_compile(checkout)  # both run as installed: from bytecode
    base = base_rss(workdir, args.baseline)
    log(f"fixed base (peak RSS on a tiny tree): {base}")
    results = []
    try:
        for size in (int(s) for s in args.sizes.split(",")):
            results.append(bench_size(size, args, workdir))
    finally:
        if not (args.keep or args.reuse) and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    report(results, base, args.modes)
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump({"base_rss_mb": base,
                       "results": [{k: v for k, v in r.items() if not k.startswith("_")}
                                   for r in results]}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
