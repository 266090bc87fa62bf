"""Sharded verify benchmark: `verify` once against N concurrent `verify --shard K/N` processes.

On one tree (an existing ROOT, or a synthetic one: benchmarks/synth.py), round after round
(order rotated, so drift hits all alike):

* `regfsck verify ROOT --json -j J` (N=1, the unsharded run), and `--no-data` (the scan and
  structural checks: what every shard repeats);
* for each N: N processes `verify ROOT --shard K/N -j J --output ...` started at once; wall
  time until the last ends, CPU seconds of all of them, bytes each hashed; then
  `regfsck report merge`, whose document must equal the unsharded one.

On N machines the hashing divides by N and the per-shard scan does not; on one machine the
shards share its cores, so compare CPU seconds (steadier under load) as well as wall time.

    python benchmarks/bench_shard.py --files 3000 --layer-size 2000000 --shards 2 4
    python benchmarks/bench_shard.py --root /srv/registry --jobs 4 --shards 2 --rounds 1
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import measure
from measure import log


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def unsharded(root: Path, jobs: int, *extra: str) -> tuple[float, float, dict[str, Any]]:
    cpu, started = _cpu(), time.perf_counter()
    proc = subprocess.run(measure.regfsck_cmd("verify", str(root), "--json", "-q", "-j",
                                              str(jobs), *extra),
                          capture_output=True, env=measure.clean_env(), check=False)
    wall = time.perf_counter() - started
    assert proc.returncode in (0, 1), proc.stderr.decode(errors="replace")
    return wall, _cpu() - cpu, json.loads(proc.stdout)


def sharded(root: Path, jobs: int, count: int, out: Path) -> tuple[float, float, list[Any], Any]:
    """N shards at once; (wall, CPU seconds of all, their reports, the merged document)."""
    paths = [out / f"n{count}-shard-{k}.json" for k in range(count)]
    cpu, started = _cpu(), time.perf_counter()
    procs = [subprocess.Popen(measure.regfsck_cmd(
        "verify", str(root), "-q", "-j", str(jobs), "--shard", f"{k}/{count}",
        "--output", str(paths[k])), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env=measure.clean_env()) for k in range(count)]
    for proc in procs:
        _, err = proc.communicate()
        assert proc.returncode in (0, 1), err.decode(errors="replace")
    wall = time.perf_counter() - started
    used = _cpu() - cpu
    merged = subprocess.run(measure.regfsck_cmd("report", "merge", "--json", *map(str, paths)),
                            capture_output=True, env=measure.clean_env(), check=False)
    assert merged.returncode in (0, 1), merged.stderr.decode(errors="replace")
    return wall, used, [json.loads(p.read_text()) for p in paths], json.loads(merged.stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, help="an existing registry root (else synthetic)")
    parser.add_argument("--files", type=int, default=3000, help="synthetic tree: about this "
                        "many files")
    parser.add_argument("--layer-size", type=int, default=2_000_000,
                        help="synthetic tree: random payload bytes per layer")
    parser.add_argument("--shards", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--jobs", type=int, default=1, help="hashing threads per process")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="regfsck-bench-shard-") as tmp:
        work = Path(tmp)
        root = args.root
        if root is None:
            root = work / "root"
            log(f"== generating a synthetic tree of about {args.files} files in {root}")
            subprocess.run([sys.executable, str(Path(__file__).parent / "synth.py"), str(root),
                            "--files", str(args.files), "--layer-size", str(args.layer_size),
                            "--jobs", str(measure.cpu_count())], check=True,
                           stdout=subprocess.DEVNULL)
        subprocess.run(["sh", "-c", f"find '{root}' -type f -name data -exec cat {{}} + "
                        ">/dev/null"], check=True)  # warm: every run reads from the page cache
        names = ["N=1", "no-data", *(f"N={n}" for n in args.shards)]
        walls: dict[str, list[float]] = {n: [] for n in names}
        cpus: dict[str, list[float]] = {n: [] for n in names}
        shares: dict[str, list[int]] = {}
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            whole: Any = None
            results: dict[str, Any] = {}
            for name in order:
                if name == "N=1":
                    wall, cpu, whole = unsharded(root, args.jobs)
                elif name == "no-data":
                    wall, cpu, _ = unsharded(root, args.jobs, "--no-data")
                else:
                    count = int(name[2:])
                    wall, cpu, parts, merged = sharded(root, args.jobs, count, work)
                    results[name] = merged
                    shares[name] = [p["summary"]["bytes_verified"] for p in parts]
                walls[name].append(wall)
                cpus[name].append(cpu)
                log(f"  round {r + 1}/{args.rounds} {name}: {wall:.2f}s wall, {cpu:.2f} CPU-s")
            for name, merged in results.items():
                assert merged == whole, f"{name}: the merged report differs from the unsharded one"
        rows = []
        print(f"{'run':<10} {'wall median (s)':>16} {'CPU median (s)':>15}  bytes hashed per shard")
        for name in names:
            row = {"run": name, "walls": [round(w, 3) for w in walls[name]],
                   "cpu": [round(c, 3) for c in cpus[name]], "shares": shares.get(name)}
            rows.append(row)
            print(f"{name:<10} {statistics.median(walls[name]):>16.2f} "
                  f"{statistics.median(cpus[name]):>15.2f}  "
                  f"{', '.join(f'{b:,}' for b in shares.get(name, [])) or '-'}")
        print("merged reports equal the unsharded report in every round")
        measure.write_results(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
