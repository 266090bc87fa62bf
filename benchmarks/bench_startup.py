"""Start-up time of the CLI, side by side with a bare 12-command typer app.

    python benchmarks/bench_startup.py [--runs N]

Runs, interleaved so that machine load hits all of them alike, N times each:

* `bare --help`: a typer app with 12 commands of 3 options each and nothing else,
  written to a temporary file (what any typer CLI pays);
* `regfsck --help`;
* `regfsck verify fixtures/registry --no-data` (the shipped 120 KiB fixture).

and prints the best and median wall time of each and the ratios to the bare app (the
target is 1.2x or less). A process is timed from fork to exit, as a shell user meets it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TARGET = 1.2

BARE_APP = '''
import typer

app = typer.Typer()


def make(name: str) -> None:
    def command(root: str = typer.Argument(None), json_output: bool = typer.Option(False, "--json"),
                jobs: int = typer.Option(0, "--jobs"), apply: bool = typer.Option(False, "--apply")) -> None:
        """A command."""
    command.__name__ = name
    app.command(name)(command)


for i in range(12):
    make(f"cmd{i}")

if __name__ == "__main__":
    app()
'''


def _time(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          check=False)
    elapsed = time.perf_counter() - start
    if done.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(argv)} exited {done.returncode}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "80"}
    with tempfile.TemporaryDirectory() as tmp:
        bare = Path(tmp) / "bare.py"
        bare.write_text(BARE_APP)
        cases = {
            "bare typer app --help": [sys.executable, str(bare), "--help"],
            "regfsck --help": [sys.executable, "-m", "regfsck", "--help"],
            "regfsck verify fixtures/registry --no-data":
                [sys.executable, "-m", "regfsck", "verify", str(REPO / "fixtures/registry"),
                 "--no-data"],
        }
        for argv in cases.values():  # warm the page cache and the .pyc files
            _time(argv, env)
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.runs):
            for name, argv in cases.items():
                times[name].append(_time(argv, env))
    base = min(times["bare typer app --help"])
    print(f"{'case':<46} {'best':>8} {'median':>8} {'ratio':>6}")
    worst = 0.0
    for name, values in times.items():
        ratio = min(values) / base
        worst = max(worst, ratio)
        print(f"{name:<46} {min(values) * 1000:7.0f}ms {statistics.median(values) * 1000:7.0f}ms "
              f"{ratio:5.2f}x")
    print(f"worst ratio {worst:.2f}x (target <= {TARGET}x): {'met' if worst <= TARGET else 'NOT met'}")


if __name__ == "__main__":
    main()
