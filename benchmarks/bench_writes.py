"""Writes at I/O speed: `import --apply`, `repair --apply`, `gc --apply` and `undo` against
`tar x` + one `sync` of the same bytes, side by side in one run.

It writes, once, in the work directory:

* an OCI image layout of --images images of --layers incompressible layers each (sizes
  spread log-uniformly, --mb MB of blobs in all) plus config and manifest: the import source;
* the registry tree that importing it produces, and `import.tar`, the tar of that tree's
  `docker/` (exactly the bytes an import writes);
* a copy whose `_layers`, revision and tag-index links all hold junk (what `repair` rewrites),
  and `repair.tar`, the tar of the good links (the bytes repair writes);
* a copy with --orphans unreferenced blobs (what `gc --apply` moves: ~20k changes).

Then, interleaved round after round (order rotated), each timed command on a fresh copy
with `sync` run before it (untimed), so no earlier write is charged to it. With
`--settle` (root), the page cache is also dropped before each one and its inputs read
back: every command starts from the same cache (its input warm, nothing else cached),
whatever ran before it; on a VM whose page-cache cost moves from round to round (these
machines) the ratios are steadier so:

* tar_import: `tar xf import.tar -C EMPTY && sync`;  import: `regfsck import EMPTY LAYOUT --apply`;
  import_undo: `regfsck undo` of that import;
* tar_repair: `tar xf repair.tar -C EMPTY && sync`;  repair: `regfsck repair --apply`;
  repair_plan: `regfsck repair` (the dry run: what repair costs before it writes anything);
  repair_recorded: `regfsck repair --apply --changed-only` after an untimed
  `regfsck repair --changed-only` (the operator's dry run, which records every verdict);
* gc: `regfsck gc --grace 0 --apply` (the orphans);  gc_undo: `regfsck undo` of it.

With `--baseline DIR` the regfsck commands are also run from another checkout (the code
before a change), in the same rounds, as `before:<name>`.

    python benchmarks/bench_writes.py
    python benchmarks/bench_writes.py --baseline /tmp/regfsck-before --rounds 3
    python benchmarks/bench_writes.py --settle --rounds 5
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import measure
from measure import Run, Series, log

from tests.realtools import OCILayoutWriter

V2 = "docker/registry/v2"
REPO = "bench/images"


def _sizes(count: int, total: int, rng: random.Random) -> list[int]:
    """`count` sizes spread log-uniformly from 1 KiB to 8 MiB, scaled to `total` bytes."""
    raw = [math.exp(rng.uniform(math.log(1 << 10), math.log(8 << 20))) for _ in range(count)]
    scale = total / sum(raw)
    return [max(512, int(r * scale)) for r in raw]


def write_layout(path: Path, images: int, layers: int, total: int) -> None:
    rng = random.Random(20261204)
    writer = OCILayoutWriter(path)
    sizes = iter(_sizes(images * layers, total, rng))
    for i in range(images):
        made = [writer.add_layer({f"l{i}-{j}.bin": rng.randbytes(next(sizes))}, "none")
                for j in range(layers)]
        writer.add_image(made, tag=f"t{i}", history=[f"ADD {j}" for j in range(layers)])


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL)


# Where the trees of earlier commands go, deleted only once the rounds are over. An ext4
# allocator skips inodes freed in the last minute or so (five more when their table is
# still dirty), scanning past each of them: right after `rm -rf` of the previous copy
# (tens of thousands of inodes) every file or directory a timed command created cost 5-10x
# (`perf`: `recently_deleted` under `ext4_create`), for regfsck and the tar floor alike
# but not equally. Nothing is deleted while commands are timed; start a run a few minutes
# after deleting big trees (an earlier run's trash included) for the same reason.
TRASH: list[Path] = []


def discard(path: Path) -> None:
    """Move `path` out of the way (into the work directory's trash), deleted later."""
    if not path.exists():
        return
    trash = TRASH[0]  # set by main
    trash.mkdir(exist_ok=True)
    path.rename(Path(tempfile.mkdtemp(dir=trash)) / path.name)


def empty_trash() -> None:
    for trash in TRASH:
        shutil.rmtree(trash, ignore_errors=True)


def fresh(path: Path) -> Path:
    discard(path)
    path.mkdir(parents=True)
    return path


def copy(src: Path, dest: Path) -> Path:
    discard(dest)
    sh("cp", "-a", str(src), str(dest))
    return dest


def ready_to_time(settle: bool, inputs: tuple[Path, ...]) -> None:
    """Before a timed command: nothing earlier left to write back (sync); with `settle`,
    also the page cache dropped and the command's inputs read back in."""
    if not settle:
        sh("sync")
        return
    measure.drop_caches()
    for path in inputs:
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        for file in files:
            with file.open("rb") as fh:
                while fh.read(1 << 20):
                    pass


def regfsck(checkout: str | None, *args: str, settle: bool = False,
            inputs: tuple[Path, ...] = ()) -> Run:
    ready_to_time(settle, inputs)
    cmd = measure.regfsck_cmd(*args, "-q")
    if checkout is None:
        return measure.run(cmd)
    return measure.baseline_run(checkout, cmd)


def tar_x(tar: Path, dest: Path, settle: bool) -> Run:
    fresh(dest)
    ready_to_time(settle, (tar,))
    return measure.run(["sh", "-c", f"tar xf '{tar}' -C '{dest}' && sync"])


def rewritable_links(root: Path) -> list[str]:
    """The v2 paths of every `_layers`, revision and tag-index link of `root` (what repair
    rewrites when they hold junk)."""
    v2 = root / V2
    rels = (path.relative_to(v2).as_posix() for path in sorted(v2.rglob("link")))
    return [rel for rel in rels
            if "/_layers/" in rel or "/_manifests/revisions/" in rel or "/index/" in rel]


def damage_links(root: Path) -> list[str]:
    """Junk in every rewritable link; returns their v2 paths."""
    damaged = rewritable_links(root)
    for rel in damaged:
        (root / V2 / rel).write_bytes(b"junk")
    return damaged


def run_rounds(groups: list[tuple[str, Callable[[], dict[str, Run]]]],
               rounds: int) -> dict[str, Series]:
    """Each group once per round, the order rotated round after round (drift hits all
    alike); every run of a group logged and kept under its name."""
    series: dict[str, Series] = {}
    for r in range(rounds):
        for _, group in groups[r % len(groups):] + groups[:r % len(groups)]:
            for name, result in group().items():
                series.setdefault(name, Series(name)).runs.append(result)
                log(f"  round {r + 1}/{rounds} {name}: {result.wall:.2f}s "
                    f"cpu {result.cpu:.2f}s {result.max_rss_kb / 1024:.0f} MB "
                    f"rc={result.returncode}")
    return series


def add_orphans(root: Path, count: int) -> None:
    rng = random.Random(7)
    import hashlib
    for i in range(count):
        data = rng.randbytes(rng.randint(200, 4000)) + b"%d" % i
        hexd = hashlib.sha256(data).hexdigest()
        path = root / V2 / "blobs/sha256" / hexd[:2] / hexd / "data"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def prepare(work: Path, args: argparse.Namespace) -> dict[str, Path]:
    paths = {name: work / name for name in ("layout", "imported", "repair_base", "gc_base")}
    paths["import_tar"] = work / "import.tar"
    paths["repair_tar"] = work / "repair.tar"
    if (work / "ready").exists():
        return paths
    log(f"writing the layout: {args.images} images x {args.layers} layers, {args.mb} MB")
    fresh(paths["layout"])
    write_layout(paths["layout"], args.images, args.layers, args.mb << 20)
    log("importing it once (the tree every round starts from)")
    fresh(paths["imported"])
    rc = regfsck(None, "import", str(paths["imported"]), str(paths["layout"]), "--repo", REPO,
                 "--apply").returncode
    if rc != 0:
        raise SystemExit(f"the setup import failed (exit {rc})")
    shutil.rmtree(paths["imported"] / "regfsck-quarantine")
    shutil.rmtree(paths["imported"] / "regfsck-state", ignore_errors=True)
    with tarfile.open(paths["import_tar"], "w") as tar:
        tar.add(paths["imported"] / "docker", "docker")
    copy(paths["imported"], paths["repair_base"])
    damaged = damage_links(paths["repair_base"])
    with tarfile.open(paths["repair_tar"], "w") as tar:
        for rel in damaged:
            tar.add(paths["imported"] / V2 / rel, f"{V2}/{rel}")
    log(f"repair: {len(damaged)} damaged links; gc: {args.orphans} orphan blobs")
    copy(paths["imported"], paths["gc_base"])
    add_orphans(paths["gc_base"], args.orphans)
    (work / "ready").write_text("")
    return paths


def round_commands(work: Path, paths: dict[str, Path], checkout: str | None,
                   prefix: str, settle: bool) -> list[tuple[str, Callable[[], dict[str, Run]]]]:
    """The timed groups of one checkout; each returns {name: run} (undo follows its apply)."""
    def timed(*args: str, inputs: tuple[Path, ...]) -> Run:
        return regfsck(checkout, *args, settle=settle, inputs=inputs)

    def import_group() -> dict[str, Run]:
        target = fresh(work / "t-import")
        applied = timed("import", str(target), str(paths["layout"]), "--repo", REPO, "--apply",
                        inputs=(paths["layout"],))
        undone = timed("undo", str(target), inputs=(target,))
        return {f"{prefix}import": applied, f"{prefix}import_undo": undone}

    def repair_group() -> dict[str, Run]:
        target = copy(paths["repair_base"], work / "t-repair")
        plan = timed("repair", str(target), inputs=(target,))
        applied = timed("repair", str(target), "--apply", inputs=(target,))
        return {f"{prefix}repair_plan": plan, f"{prefix}repair": applied}

    def repair_after_dry_run_group() -> dict[str, Run]:
        # The operator's sequence: a dry run (which records every verdict), then the apply
        # with --changed-only, which re-hashes only what changed since.
        target = copy(paths["repair_base"], work / "t-repair")
        dry = regfsck(checkout, "repair", str(target), "--changed-only")  # untimed
        if dry.returncode not in (0, 1):
            raise SystemExit(f"repair --changed-only (dry run) failed (exit {dry.returncode})")
        applied = timed("repair", str(target), "--apply", "--changed-only", inputs=(target,))
        return {f"{prefix}repair_recorded": applied}

    def gc_group() -> dict[str, Run]:
        target = copy(paths["gc_base"], work / "t-gc")
        applied = timed("gc", str(target), "--grace", "0", "--apply", inputs=(target,))
        undone = timed("undo", str(target), inputs=(target,))
        return {f"{prefix}gc": applied, f"{prefix}gc_undo": undone}

    groups = [(f"{prefix}import", import_group), (f"{prefix}repair", repair_group),
              (f"{prefix}gc", gc_group)]
    if checkout is None:  # (`repair --changed-only` is new: not in a baseline checkout)
        groups.append((f"{prefix}repair_recorded", repair_after_dry_run_group))
    return groups


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=int, default=256, help="MB of blobs in the import")
    parser.add_argument("--images", type=int, default=150)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--orphans", type=int, default=20000, help="blobs gc moves")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", help="another regfsck checkout to time alongside")
    parser.add_argument("--workdir")
    parser.add_argument("--keep", action="store_true", help="leave the work directory")
    parser.add_argument("--json", dest="json_out")
    parser.add_argument("--settle", action="store_true",
                        help="drop the page cache before each timed command, then read its "
                        "inputs back (root)")
    args = parser.parse_args(argv)
    work = Path(args.workdir) if args.workdir else Path(
        os.environ.get("TMPDIR", "/tmp")) / f"bench-writes-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    TRASH[:] = [work / "trash"]  # (a kept work directory's old trash goes at the end too)
    try:
        paths = prepare(work, args)
        groups = round_commands(work, paths, None, "", args.settle)
        if args.baseline:
            groups += round_commands(work, paths, args.baseline, "before:", args.settle)
        groups += [("tar_import", lambda: {"tar_import": tar_x(paths["import_tar"], work / "t-tar",
                                                               args.settle)}),
                   ("tar_repair", lambda: {"tar_repair": tar_x(paths["repair_tar"], work / "t-tar",
                                                               args.settle)})]
        series = run_rounds(groups, args.rounds)
        report(series, bool(args.baseline))
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(
                {"args": vars(args), "series": [s.to_json() for s in series.values()]}, indent=1))
    finally:
        empty_trash()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def report(series: dict[str, Series], baseline: bool) -> None:
    def med(name: str) -> float:
        return series[name].median

    print(f"{'command':<22} {'median s':>9} {'best s':>8} {'cpu s':>7} {'RSS MB':>7}  rc")
    for s in series.values():
        codes = sorted({r.returncode for r in s.runs})
        print(f"{s.name:<22} {s.median:9.2f} {s.best:8.2f} {s.cpu_median:7.2f} {s.rss_mb:7.0f}  {codes}")
    print()
    for prefix in ["", "before:"] if baseline else [""]:
        label = prefix or "now:"
        ratios = [
            ("import --apply / (tar x + sync)", med(f"{prefix}import") / med("tar_import")),
            ("repair --apply / (tar x + sync)", med(f"{prefix}repair") / med("tar_repair")),
            ("repair: apply - plan (s)", med(f"{prefix}repair") - med(f"{prefix}repair_plan")),
            *([("repair --apply --changed-only after its dry run / (tar x + sync)",
                med("repair_recorded") / med("tar_repair"))] if not prefix else []),
            ("gc undo / gc --apply", med(f"{prefix}gc_undo") / med(f"{prefix}gc")),
            ("import undo / import --apply", med(f"{prefix}import_undo") / med(f"{prefix}import")),
        ]
        for what, value in ratios:
            print(f"{label:<8} {what:<62} {value:6.2f}")
    if baseline:
        print()
        for name in ("import", "import_undo", "repair", "repair_plan", "gc", "gc_undo"):
            print(f"now / before  {name:<12} {med(name) / med('before:' + name):6.2f}"
                  f"   ({med('before:' + name):.2f} s -> {med(name):.2f} s)")


if __name__ == "__main__":
    sys.exit(main())
