"""Shared helpers of the benchmarks: run a command, measure wall time and peak RSS.

Peak RSS comes from `wait4` (the kernel's `ru_maxrss` of the child), so it covers Go, C and
Python children alike. Commands of one comparison are run interleaved, round after round,
and summarised by their median, because this machine is shared and noisy.
"""

from __future__ import annotations

import compileall
import functools
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import synth  # benchmarks/ is on sys.path: every benchmark puts it there first

REPO_ROOT = Path(__file__).resolve().parent.parent
REGISTRY_BIN = "docker-registry"
TIME_BIN = "/usr/bin/time"  # GNU time, for the peak RSS of a command


@dataclass
class Run:
    wall: float
    max_rss_kb: int
    returncode: int
    stdout: bytes = b""
    cpu: float = 0.0  # user + system seconds of the command and its children


@dataclass
class Series:
    """Repeated runs of one command."""

    name: str
    runs: list[Run] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(r.wall for r in self.runs)

    @property
    def best(self) -> float:
        return min(r.wall for r in self.runs)

    @property
    def cpu_median(self) -> float:
        """CPU seconds (user + system): steadier than wall time when others load the machine."""
        return statistics.median(r.cpu for r in self.runs)

    @property
    def rss_mb(self) -> float:
        return max(r.max_rss_kb for r in self.runs) / 1024

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "walls": [round(r.wall, 3) for r in self.runs],
                "median": round(self.median, 3), "best": round(self.best, 3),
                "cpu": [round(r.cpu, 3) for r in self.runs],
                "max_rss_mb": round(self.rss_mb, 1),
                "returncodes": sorted({r.returncode for r in self.runs})}


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment without REGISTRY_* overrides and AWS_CA_BUNDLE (breaks the registry)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("REGISTRY_") and k != "AWS_CA_BUNDLE"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


def run(cmd: Sequence[str], *, capture: bool = False, env: Mapping[str, str] | None = None,
        timeout: float = 7200, cwd: str | None = None) -> Run:
    """Run `cmd`; wall time and the command's peak RSS (stdout kept only when `capture`).

    The RSS comes from GNU time: a child forked from this (large) Python process would
    inherit its high-water mark, a child forked from `time` does not."""
    with tempfile.TemporaryFile() as out, tempfile.NamedTemporaryFile("r") as rss:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        proc = subprocess.run([TIME_BIN, "-f", "%M", "-o", rss.name, *cmd],
                              stdin=subprocess.DEVNULL,
                              stdout=out if capture else subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env=dict(env or clean_env()),
                              timeout=timeout, check=False, cwd=cwd)
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        lines = [line for line in rss.read().splitlines() if line.strip().isdigit()]
        data = b""
        if capture:
            out.seek(0)
            data = out.read()
    return Run(wall, int(lines[-1]) if lines else 0, proc.returncode, data, cpu)


def interleaved(commands: Mapping[str, Callable[[], Run]], rounds: int,
                log: Callable[[str], None] | None = None) -> dict[str, Series]:
    """Run each command once per round, rotating the order, so drift hits all alike."""
    series = {name: Series(name) for name in commands}
    names = list(commands)
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            result = commands[name]()
            series[name].runs.append(result)
            if log is not None:
                log(f"  round {r + 1}/{rounds} {name}: {result.wall:.2f}s "
                    f"{result.max_rss_kb / 1024:.0f} MB rc={result.returncode}")
    return series


def byte_compile(checkout: str | Path) -> None:
    """Compile a checkout's package to bytecode, as installing it does (pip compiles what
    it installs). Timed runs then measure the tool an operator runs: on a machine that
    sets PYTHONDONTWRITEBYTECODE (these do) a checkout is otherwise compiled from source
    at every start, 0.1 s of each run of `gc`."""
    compileall.compile_dir(str(Path(checkout) / "regfsck"), quiet=1)


@functools.cache
def compiled(checkout: str) -> None:
    """`byte_compile` a checkout once per benchmark process."""
    byte_compile(checkout)


def regfsck_cmd(*args: str) -> list[str]:
    """The command running this checkout's regfsck, byte-compiled first (every benchmark
    asks for its commands here, so none times a start-up compiling from source)."""
    compiled(str(Path(__file__).resolve().parent.parent))
    return [sys.executable, "-m", "regfsck", *args]


def baseline_run(checkout: str, cmd: Sequence[str], *, capture: bool = False) -> Run:
    """`run` with another checkout's regfsck (the code before a change): its directory
    alone on PYTHONPATH, and a working directory that holds no `regfsck` package (python
    -m looks in the working directory first), byte-compiled as this checkout is."""
    compiled(str(Path(checkout).resolve()))
    return run(cmd, capture=capture, env=clean_env({"PYTHONPATH": checkout}), cwd="/")


def have(binary: str) -> bool:
    return shutil.which(binary) is not None


def registry_config(path: Path, root: Path) -> Path:
    """A minimal distribution config for the official collector on `root`."""
    path.write_text("version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n"
                    f"    rootdirectory: {root}\n  delete:\n    enabled: true\n"
                    "http:\n  addr: 127.0.0.1:0\n")
    return path


def official_gc_blobs(output: bytes) -> set[str]:
    """Blob digests the 2.8 collector's dry run lists as eligible for deletion."""
    prefix = b"blob eligible for deletion: "
    return {line[len(prefix):].strip().decode() for line in output.splitlines()
            if line.startswith(prefix)}


def drop_caches() -> None:
    """Write back and drop the page, dentry and inode caches (root only)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as fh:
        fh.write("3\n")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def count_files(root: Path) -> int:
    """Regular files below `root` (what `find -type f` counts: the size of a tree)."""
    return run(["find", str(root), "-type", "f"], capture=True).stdout.count(b"\n")


def synthetic_tree(target: int, workdir: Path, *, reuse: bool,
                   jobs: int | None = None) -> tuple[Path, synth.SynthResult]:
    """The synthetic tree of about `target` files in `workdir/tree-TARGET` (benchmarks/
    synth.py), or the one a `--keep` run left there when `reuse` (with its summary beside it,
    so the agreement checks still know which blobs are unreferenced)."""
    root = workdir / f"tree-{target}"
    summary = workdir / f"tree-{target}.json"
    if reuse and root.exists() and summary.exists():
        log(f"== {target} files: reusing {root}")
        return root, synth.SynthResult.from_json(json.loads(summary.read_text()))
    if root.exists():
        shutil.rmtree(root)
    config = synth.SynthConfig.for_files(target)
    log(f"== {target} files: generating {config.repositories} repositories in {root}")
    result = synth.generate(root, config, jobs=jobs or cpu_count())
    summary.write_text(json.dumps(result.to_json()))
    return root, result


def write_results(path: str | None, results: Sequence[Mapping[str, object]]) -> None:
    """`--json FILE`: the figures, without the private (`_`-prefixed) entries."""
    if path:
        with open(path, "w") as fh:
            json.dump([{k: v for k, v in r.items() if not k.startswith("_")} for r in results],
                      fh, indent=2)
