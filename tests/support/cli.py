"""Running regfsck from a test: in a real process (`run`) or in this one (`invoke`).

`run` starts `python -m regfsck` with this checkout first on PYTHONPATH, so the child
imports the package under test whatever the current directory. Use it where the process is
the point: signals, exit codes set by the interpreter, file descriptors, a wrapper prefix
(setpriv, strace, a killing script), a terminal.

`invoke` calls the typer app through typer's `CliRunner` in this process: the same
arguments, the same stdout/stderr/exit code, without paying the interpreter and typer
start-up for every call (most of the fast tier's time). Between calls it resets what a
process would have started fresh: the output settings the global flags set, and the SIGINT
handler. An exception that would reach `regfsck.cli.app.main`'s last-resort handler is
re-raised, so the test shows its traceback instead of "internal error".

Both return a `subprocess.CompletedProcess` (`returncode`, `stdout`, `stderr`, text unless
`text=False`), so a test reads the result the same way whichever it uses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, overload

from tests.support import REPO_ROOT

TIMEOUT = 300.0
INTERRUPTED = 130  # the exit code of a run ended by Ctrl-C (README)


def command(*args: str, prefix: Sequence[str] = ()) -> list[str]:
    """The argv that starts regfsck (after an optional wrapper such as setpriv)."""
    return [*prefix, sys.executable, "-m", "regfsck", *args]


def child_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's environment) with this checkout first on PYTHONPATH."""
    out = dict(os.environ if env is None else env)
    paths = [p for p in out.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(REPO_ROOT)]
    out["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *paths])
    return out


@overload
def run(*args: str, env: Mapping[str, str] | None = ..., cwd: Path | None = ...,
        timeout: float = ..., prefix: Sequence[str] = ..., text: Literal[True] = ...,
        **popen: Any) -> subprocess.CompletedProcess[str]: ...
@overload
def run(*args: str, env: Mapping[str, str] | None = ..., cwd: Path | None = ...,
        timeout: float = ..., prefix: Sequence[str] = ..., text: Literal[False],
        **popen: Any) -> subprocess.CompletedProcess[bytes]: ...
def run(*args: str, env: Mapping[str, str] | None = None, cwd: Path | None = None,
        timeout: float = TIMEOUT, prefix: Sequence[str] = (), text: bool = True,
        **popen: Any) -> subprocess.CompletedProcess[Any]:
    """regfsck in a child process, stdout and stderr captured, never raising on its exit code.

    `env` replaces the environment (PYTHONPATH is still pointed at this checkout); `popen`
    passes on anything else `subprocess.run` takes (stdin, preexec_fn, input)."""
    return subprocess.run(command(*args, prefix=prefix), capture_output=True, text=text,
                          env=child_env(env), cwd=cwd, timeout=timeout, check=False, **popen)


@contextlib.contextmanager
def _fresh_process_state(cwd: Path | None) -> Iterator[None]:
    """What a new process would start with, restored afterwards."""
    from regfsck.cli.common import SETTINGS, Settings

    saved_settings = dataclasses.asdict(SETTINGS)
    for field in dataclasses.fields(Settings):
        setattr(SETTINGS, field.name, field.default)
    saved_sigint = signal.getsignal(signal.SIGINT)
    saved_cwd = os.getcwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        yield
    finally:
        os.chdir(saved_cwd)
        signal.signal(signal.SIGINT, saved_sigint)
        for name, value in saved_settings.items():
            setattr(SETTINGS, name, value)


@overload
def invoke(*args: str, env: Mapping[str, str] | None = ..., cwd: Path | None = ...,
           input: str | bytes | None = ..., text: Literal[True] = ...
           ) -> subprocess.CompletedProcess[str]: ...
@overload
def invoke(*args: str, env: Mapping[str, str] | None = ..., cwd: Path | None = ...,
           input: str | bytes | None = ..., text: Literal[False]
           ) -> subprocess.CompletedProcess[bytes]: ...
def invoke(*args: str, env: Mapping[str, str] | None = None, cwd: Path | None = None,
           input: str | bytes | None = None, text: bool = True
           ) -> subprocess.CompletedProcess[Any]:
    """regfsck in this process through typer's CliRunner (stdin, stdout and stderr are not
    terminals, as with `run`). `env` replaces the environment for the call, as for `run`."""
    from typer.testing import CliRunner

    from regfsck.cli.app import app

    overrides: dict[str, str | None] | None = None
    if env is not None:
        overrides = {name: None for name in os.environ if name not in env}
        overrides.update(env)
    with _fresh_process_state(cwd):
        result = CliRunner().invoke(app, list(args), input=input, env=overrides,
                                    prog_name="regfsck", catch_exceptions=True)
    stdout, stderr = result.stdout_bytes, result.stderr_bytes or b""
    returncode, error = result.exit_code, result.exception
    if isinstance(error, KeyboardInterrupt):  # as main() does
        stderr += b"regfsck: interrupted\n"
        returncode = INTERRUPTED
    elif error is not None and not isinstance(error, SystemExit):
        raise error
    out: Any = (stdout.decode(errors="replace"), stderr.decode(errors="replace")) if text \
        else (stdout, stderr)
    return subprocess.CompletedProcess(["regfsck", *args], returncode, *out)


# A regfsck process that ends itself at one call of its storage: a crash at a chosen point.
_KILLING = """
import importlib, os, signal, sys, threading
module, name, method, match, nth, when = sys.argv[1:7]
storage = getattr(importlib.import_module(module), name)
original = getattr(storage, method)
seen = [0]
counting = threading.Lock()  # calls from several threads (a copy's parts): each gets its number
SIGNALS = {"before": signal.SIGKILL, "after": signal.SIGKILL, "ctrl-c": signal.SIGINT}

def ending(self, *args, **kwargs):
    first = args[0] if args else next(iter(kwargs.values()), "")
    hit = match in str(first)
    mine = 0
    if hit:
        with counting:
            seen[0] += 1
            mine = seen[0]
    due = hit and mine == int(nth)
    if due and when == "before":
        os.kill(os.getpid(), SIGNALS[when])
    result = original(self, *args, **kwargs)
    if due and when != "before":
        os.kill(os.getpid(), SIGNALS[when])
    return result

setattr(storage, method, ending)
sys.argv = ["regfsck", *sys.argv[7:]]
from regfsck.cli.app import main
main()
"""

KillPoint = tuple[str, str, int, str]


def kill_at_pause(hooks: Path, phase: str, *args: str,
                  env: Mapping[str, str] | None = None, wait: float = 120) -> None:
    """Start regfsck `args` with a pause hook before `phase` (REGFSCK_TEST_PAUSE_DIR:
    `<phase>.pause` in `hooks`), wait until it is reached, then SIGKILL the process: a run
    killed at a known point of its sweep."""
    hooks.mkdir(exist_ok=True)
    (hooks / f"{phase}.pause").touch()
    proc = subprocess.Popen(command(*args),
                            env=child_env({**(os.environ if env is None else env),
                                           "REGFSCK_TEST_PAUSE_DIR": str(hooks)}),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + wait
        while not (hooks / f"{phase}.reached").exists():
            assert proc.poll() is None and time.monotonic() < deadline, f"never paused at {phase}"
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)


def run_killed(storage: str, point: KillPoint, *args: str,
               env: Mapping[str, str] | None = None, timeout: float = TIMEOUT
               ) -> subprocess.CompletedProcess[str]:
    """regfsck `args` in a child process that ends itself at `point` = (method of the
    `storage` class, e.g. "regfsck.storage.FilesystemStorage", a substring of the call's
    first argument, which matching call (1-based), "before" it runs, "after" it, both by
    SIGKILL, or "ctrl-c": SIGINT after it). Captured as `run` does, never raising."""
    module, name = storage.rsplit(".", 1)
    return subprocess.run([sys.executable, "-c", _KILLING, module, name, *map(str, point), *args],
                          capture_output=True, text=True, env=child_env(env), cwd=REPO_ROOT,
                          timeout=timeout, check=False)
