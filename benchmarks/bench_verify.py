"""Verify benchmark: `regfsck verify --json` against the machine's hashing limit.

For each blob-size profile it writes a synthetic tree holding about --mb of blobs
(benchmarks/synth.py), then, interleaved round after round on the same tree:

* the limit: every blob file hashed with OpenSSL sha256, one process per core
  (`xargs -P CORES openssl dgst -sha256`);
* `regfsck verify ROOT --json` (default jobs = CPU count), and with `-j 1`, `-j 2`, `-j 2N`
  to show how hashing scales with threads;
* `regfsck verify --no-data` (the structural part alone, for reference).

It prints the ratio verify / limit (target: within 1.2x), MB/s, and peak RSS (target: under
200 MB whatever the blob sizes).

    python benchmarks/bench_verify.py                  # small, mixed, large; 512 MB each
    python benchmarks/bench_verify.py --profiles large --mb 2048 --rounds 5
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
from measure import Series, log

PROFILES: dict[str, dict[str, Any]] = {
    # configs and manifests dominate many registries: 4-16 KiB blobs
    "small": {"layer_sizes": (4096, 8192, 16384), "unique_layers": 6, "tags_per_repo": 2},
    # a spread from 16 KiB to 16 MiB
    "mixed": {"layer_sizes": (16 << 10, 256 << 10, 2 << 20, 16 << 20)},
    # large layers only
    "large": {"layer_sizes": (64 << 20,)},
    # a few very large blobs (memory must not follow the blob size)
    "huge": {"layer_sizes": (512 << 20,), "tags_per_repo": 1, "unique_layers": 1},
}


def blob_list(root: Path, workdir: Path, name: str) -> tuple[Path, int, int]:
    """A NUL-separated list of every blob data file; (list, files, bytes)."""
    listing = workdir / f"{name}.blobs"
    files = total = 0
    with open(listing, "wb") as out:
        for dirpath, _, filenames in os.walk(root / synth.V2 / "blobs"):
            if "data" in filenames:
                path = os.path.join(dirpath, "data")
                out.write(path.encode() + b"\0")
                files += 1
                total += os.lstat(path).st_size
    return listing, files, total


def limit_command(listing: Path, files: int, cores: int) -> list[str]:
    per_call = max(1, min(2000, files // (cores * 8) or 1))
    return ["sh", "-c", f"xargs -0 -P {cores} -n {per_call} openssl dgst -sha256 < {listing} "
            "> /dev/null"]


def tree(name: str, mb: int, workdir: Path, reuse: bool) -> Path:
    root = workdir / f"verify-{name}-{mb}"
    if reuse and root.exists():
        log(f"== {name}: reusing {root}")
        return root
    if root.exists():
        shutil.rmtree(root)
    config = synth.config_for_bytes(mb << 20, **PROFILES[name])
    log(f"== {name}: generating {config.repositories} repositories of layers "
        f"{config.layer_sizes} in {root}")
    result = synth.generate(root, config, jobs=measure.cpu_count())
    log(f"   {result.files} files, {result.bytes / 1e6:.0f} MB, written in {result.seconds:.0f}s")
    return root


def bench_profile(name: str, mb: int, workdir: Path, rounds: int, keep: bool,
                  reuse: bool) -> dict[str, Any]:
    root = tree(name, mb, workdir, reuse)
    cores = measure.cpu_count()
    listing, files, total = blob_list(root, workdir, name)
    log(f"   {files} blob files, {total / 1e6:.0f} MB; {cores} cores")
    jobs = sorted({1, 2, cores, 2 * cores})
    commands = {
        "limit_openssl": lambda: measure.run(limit_command(listing, files, cores)),
        "verify": lambda: measure.run(measure.regfsck_cmd("verify", str(root), "--json")),
        "verify_no_data": lambda: measure.run(
            measure.regfsck_cmd("verify", "--no-data", str(root), "--json")),
    }
    for j in jobs:
        commands[f"verify_j{j}"] = (lambda j=j: measure.run(
            measure.regfsck_cmd("verify", str(root), "--json", "-j", str(j))))
    measure.run(limit_command(listing, files, cores))  # warm the page cache
    check = measure.run(measure.regfsck_cmd("verify", str(root), "--json"), capture=True)
    summary = json.loads(check.stdout)["summary"]
    if check.returncode != 0 or summary["bytes_verified"] != total:
        raise SystemExit(f"verify did not check the whole tree: rc {check.returncode}, {summary}")
    series = measure.interleaved(commands, rounds, log)
    if not keep:
        shutil.rmtree(root)
    return {"profile": name, "files": files, "bytes": total, "cores": cores, "jobs": jobs,
            "series": {k: v.to_json() for k, v in series.items()}, "_series": series}


def report(results: list[dict[str, Any]]) -> None:
    print("\nverify against the OpenSSL limit (medians of the rounds)")
    print(f"{'profile':>8} {'blobs':>8} {'MB':>7} {'limit':>8} {'verify':>8} {'ratio':>6} "
          f"{'MB/s':>7} {'limit MB/s':>10} {'peak RSS':>9} {'no-data':>8} {'cpu ratio':>9}")
    for res in results:
        s: dict[str, Series] = res["_series"]
        mb = res["bytes"] / 1e6
        lim, ver = s["limit_openssl"].median, s["verify"].median
        print(f"{res['profile']:>8} {res['files']:>8} {mb:>7.0f} {lim:>7.2f}s {ver:>7.2f}s "
              f"{ver / lim:>6.2f} {mb / ver:>7.0f} {mb / lim:>10.0f} "
              f"{s['verify'].rss_mb:>6.0f} MB {s['verify_no_data'].median:>7.2f}s "
              f"{s['verify'].cpu_median / s['limit_openssl'].cpu_median:>9.2f}")
    print("\nhashing threads (-j): wall time, speed-up over -j 1, peak RSS")
    for res in results:
        s = res["_series"]
        one = s["verify_j1"].median
        cells = [f"-j{j}: {s[f'verify_j{j}'].median:.2f}s x{one / s[f'verify_j{j}'].median:.2f} "
                 f"{s[f'verify_j{j}'].rss_mb:.0f}MB" for j in res["jobs"]]
        print(f"{res['profile']:>8}  " + "   ".join(cells))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profiles", default="small,mixed,large",
                        help=f"comma-separated, of {', '.join(PROFILES)} (default %(default)s)")
    parser.add_argument("--mb", type=int, default=512, help="MB of blobs per profile (>= 100)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", help="where to write the trees (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the generated trees")
    parser.add_argument("--reuse", action="store_true", help="reuse trees left by --keep")
    parser.add_argument("--json", dest="json_out", help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.mb < 100:
        parser.error("--mb must be at least 100")
    if not measure.have("openssl"):
        raise SystemExit("openssl is not installed: no limit to compare against")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="regfsck-bench-verify-"))
    workdir.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        for name in args.profiles.split(","):
            results.append(bench_profile(name, args.mb, workdir, args.rounds,
                                         args.keep or args.reuse, args.reuse))
    finally:
        if not (args.keep or args.reuse) and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    report(results)
    measure.write_results(args.json_out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
