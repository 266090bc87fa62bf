"""What a link replace costs the kernel, apart from regfsck: is `repair --apply` slow because of
its code or because of the changes it must make?

On the trees of `bench_writes.py` (same --images/--mb/--workdir: its `repair_base`, links
full of junk, and `repair.tar`, the good links), interleaved round after round, each on a
fresh copy, nothing deleted while timing:

* tar: `tar xf repair.tar -C EMPTY && sync` (bench_writes' floor);
* bare_mirror: the changes a journaled, undoable replace makes, in a bare Python loop (no
  journal, no checks): read the link, stage the new one in one staging directory, move the
  old one into a quarantine that mirrors the tree (a directory made per link, as regfsck's
  quarantine does), rename the new one in; one sync;
* bare_flat: the same, the old links kept in one flat quarantine directory (no directory
  made per link);
* regfsck_run: the same replaces through regfsck's own journaled `Run` (the one mutation
  path of gc, import, repair and undo: journal, checks, owners and modes, quarantine), in
  a process of its own, read then `replace_file` for each link as `repair` does, timed
  like the bare loops: from the first change to the end of `finish` (every batch synced),
  without the session's opening, the plan and the verify around it in `repair`; with
  `--baseline DIR`, also another checkout's `Run` (`before:regfsck_run`) in the same rounds;
* regfsck: `regfsck repair --no-data --apply` minus its dry run (`repair --no-data`), timed
  on the same copy first: what applying costs beyond planning.

The bare loops are timed from their first change to the end of their sync (not Python's
start-up nor the walk that lists the links).

    python benchmarks/bench_replace_floor.py --images 1500 --workdir /tmp/bw9k --keep

Measured 2026-12-05 (9,000 links, `--images 1500 --orphans 2000 --rounds 3`, docs/scale.md):
tar 0.87 s, bare_mirror 1.12 s, bare_flat 0.77 s, regfsck apply - plan 3.27 s. The changes
themselves cost 1.3x `tar x`; regfsck's code around them is the rest (2.9x the bare loop).
Start it a few minutes after deleting big trees (see bench_writes.TRASH): right after one,
the bare mirrored loop measured 2.2x `tar x`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench_writes
import measure
from measure import Run


def bare_replace(root: Path, flat: bool) -> None:
    """The changes of a journaled replace of every damaged link of `root`, and nothing else."""
    links = bench_writes.rewritable_links(root)
    for name in ("q", "q/new", "q/v2", "q/flat"):
        os.mkdir(root / name, 0o700)
    started = time.perf_counter()  # the changes and the sync, not start-up and the walk
    base = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    staging = os.open("q/new", os.O_RDONLY | os.O_DIRECTORY, dir_fd=base)
    flat_dir = os.open("q/flat", os.O_RDONLY | os.O_DIRECTORY, dir_fd=base)
    made: set[str] = set()
    for number, rel in enumerate(links):
        parent = rel.rpartition("/")[0]
        tree_dir = os.open(f"{bench_writes.V2}/{parent}", os.O_RDONLY | os.O_DIRECTORY
                           | os.O_NOFOLLOW, dir_fd=base)
        fd = os.open("link", os.O_RDONLY, dir_fd=tree_dir)
        os.read(fd, 4096)
        os.close(fd)
        if flat:
            held_dir, held_name = flat_dir, str(number)
        else:
            parts = parent.split("/")
            for depth in range(1, len(parts) + 1):
                path = "q/v2/" + "/".join(parts[:depth])
                if path not in made:
                    os.mkdir(path, 0o700, dir_fd=base)
                    made.add(path)
            held_dir = os.open(f"q/v2/{parent}", os.O_RDONLY | os.O_DIRECTORY, dir_fd=base)
            held_name = "link"
        fd = os.open(str(number), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=staging)
        os.write(fd, b"sha256:" + b"0" * 64)
        os.close(fd)
        os.rename("link", held_name, src_dir_fd=tree_dir, dst_dir_fd=held_dir)
        os.rename(str(number), "link", src_dir_fd=staging, dst_dir_fd=tree_dir)
        if not flat:
            os.close(held_dir)
        os.close(tree_dir)
    os.sync()
    print(f"{time.perf_counter() - started:.6f}")


# The same replaces through regfsck's `Run`, as `repair`'s Applier makes them: each link read
# through the run's storage, then `replace_file`, all in one `batch`. A program of its own,
# so that a baseline checkout runs it with its own regfsck (`measure.baseline_run`).
RUN_REPLACE = """
import sys, time
from pathlib import Path
from regfsck.root import locate
from regfsck.session import mutation_session
root, links = Path(sys.argv[1]), Path(sys.argv[2]).read_text().split()
new = b"sha256:" + b"0" * 64
with mutation_session(locate(root), command="bench") as session:
    started = time.perf_counter()
    run = session.begin({"bench": "replace"})
    with run.batch():
        for rel in links:
            run.settle(rel)
            run.storage.read_small("docker/registry/v2/" + rel, 4096)
            run.replace_file(rel, new)
    run.finish()
    print(f"{time.perf_counter() - started:.6f}")
"""


def timed_run(work: Path, base: Path, checkout: str | None) -> Run:
    """`RUN_REPLACE` on a fresh copy, with this checkout's regfsck or `checkout`'s."""
    target = bench_writes.copy(base, work / "t-bare")
    listing = work / "links.txt"
    listing.write_text("\n".join(bench_writes.rewritable_links(target)))
    bench_writes.ready_to_time(False, ())
    cmd = [sys.executable, "-c", RUN_REPLACE, str(target), str(listing)]
    return printed_time(measure.baseline_run(checkout, cmd, capture=True) if checkout else
                        measure.run(cmd, capture=True, env=measure.clean_env(), cwd="/"))


def timed_bare(work: Path, base: Path, flat: bool) -> Run:
    """The bare loop in a process of its own; its time is the loop's and the sync's (what
    it prints), without the interpreter's start-up and the walk that finds the links."""
    target = bench_writes.copy(base, work / "t-bare")
    bench_writes.ready_to_time(False, ())
    return printed_time(measure.run([sys.executable, __file__, "--bare", str(target)]
                                    + (["--flat"] if flat else []), capture=True))


def printed_time(result: Run) -> Run:
    """A timed loop's run with the time it printed (its loop and sync alone)."""
    return Run(float(result.stdout.split()[-1]), result.max_rss_kb, result.returncode,
               cpu=result.cpu)


def timed_regfsck(work: Path, base: Path) -> dict[str, Run]:
    target = bench_writes.copy(base, work / "t-regfsck")
    plan = bench_writes.regfsck(None, "repair", str(target), "--no-data")
    applied = bench_writes.regfsck(None, "repair", str(target), "--no-data", "--apply")
    return {"regfsck_plan": plan, "regfsck_apply": applied}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bare", help=argparse.SUPPRESS)
    parser.add_argument("--flat", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--baseline", help="another regfsck checkout: its Run timed alongside")
    parser.add_argument("--mb", type=int, default=256)
    parser.add_argument("--images", type=int, default=150)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--orphans", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args(argv)
    if args.bare:
        bare_replace(Path(args.bare), args.flat)
        return 0
    work = Path(args.workdir) if args.workdir else Path(
        os.environ.get("TMPDIR", "/tmp")) / f"bench-replace-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    bench_writes.TRASH[:] = [work / "trash"]
    try:
        paths = bench_writes.prepare(work, args)
        base = paths["repair_base"]
        series = bench_writes.run_rounds([
            ("tar", lambda: {"tar": bench_writes.tar_x(paths["repair_tar"], work / "t-tar", False)}),
            ("bare_mirror", lambda: {"bare_mirror": timed_bare(work, base, False)}),
            ("bare_flat", lambda: {"bare_flat": timed_bare(work, base, True)}),
            ("regfsck_run", lambda: {"regfsck_run": timed_run(work, base, None)}),
            *([("before:regfsck_run", lambda: {"before:regfsck_run": timed_run(
                work, base, args.baseline)})] if args.baseline else []),
            ("regfsck", lambda: timed_regfsck(work, base)),
        ], args.rounds)
    finally:
        bench_writes.empty_trash()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    med = {name: s.median for name, s in series.items()}
    for name, s in series.items():
        print(f"{name:<15} median {s.median:6.2f} s   best {s.best:6.2f} s")
    apply_only = med["regfsck_apply"] - med["regfsck_plan"]
    print(f"\nregfsck apply - plan: {apply_only:.2f} s")
    for what, value in (("bare_mirror / tar", med["bare_mirror"] / med["tar"]),
                        ("bare_flat / tar", med["bare_flat"] / med["tar"]),
                        ("regfsck_run / bare_mirror", med["regfsck_run"] / med["bare_mirror"]),
                        ("regfsck_run / tar", med["regfsck_run"] / med["tar"]),
                        *([("before:regfsck_run / bare_mirror",
                            med["before:regfsck_run"] / med["bare_mirror"]),
                           ("regfsck_run now / before",
                            med["regfsck_run"] / med["before:regfsck_run"])]
                          if args.baseline else []),
                        ("regfsck (apply - plan) / bare_mirror", apply_only / med["bare_mirror"]),
                        ("regfsck (apply - plan) / tar", apply_only / med["tar"])):
        print(f"{what:<40} {value:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
