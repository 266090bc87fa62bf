"""Ctrl-C on verify: a real subprocess hashing a large tree gets SIGINT and must exit 130
with a partial summary (and, with --json, one valid JSON object saying so); a SIGINT at
any earlier moment, while the CLI is still starting, exits 130 without a traceback.

The large tree is the real sample plus sparse blobs of many GiB (no disk space used, but
every byte is read and hashed), so hashing is certainly still running when the signal comes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.hostile import (
    assert_clean_exit,
    cli_env,
    strict_json,
)
from tests.realtools import SampleInfo
from tests.support import V2, cli

BIG_BLOBS = 4
BIG_SIZE = 8 << 30  # 8 GiB each, sparse


@pytest.fixture(scope="module")
def big_tree(real_sample: tuple[Path, SampleInfo],
             tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """The real sample plus sparse multi-GiB blobs (fake digests: they would mismatch)."""
    import shutil

    root = tmp_path_factory.mktemp("interrupt") / "root"
    shutil.copytree(real_sample[0], root, symlinks=True)
    big = []
    for i in range(BIG_BLOBS):
        hex_part = f"{i + 1:02x}" * 32
        data = root / V2 / "blobs" / "sha256" / hex_part[:2] / hex_part / "data"
        data.parent.mkdir(parents=True)
        with open(data, "wb") as fh:
            fh.truncate(BIG_SIZE)
        big.append(data)
    return root, big


def wait_until_hashing(proc: subprocess.Popen[bytes], big: list[Path], timeout: float = 60) -> None:
    """Block until the process holds one of the big blobs open (it is hashing)."""
    wanted = {str(p) for p in big}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "verify ended before it was interrupted"
        try:
            fds = os.listdir(f"/proc/{proc.pid}/fd")
        except FileNotFoundError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{proc.pid}/fd/{fd}") in wanted:
                    return
            except OSError:
                continue
        time.sleep(0.01)
    pytest.fail("verify never started hashing the big blobs")


@pytest.mark.parametrize("jobs", ["1", "2"])
@pytest.mark.parametrize("as_json", [True, False])
def test_sigint_while_hashing_gives_a_partial_summary(big_tree: tuple[Path, list[Path]], jobs: str,
                                                       as_json: bool) -> None:
    root, big = big_tree
    args = ["verify", str(root), "--jobs", jobs, *(["--json"] if as_json else [])]
    proc = subprocess.Popen(cli.command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, env=cli_env())
    try:
        wait_until_hashing(proc, big)
        time.sleep(0.2)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        stopped_after = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    result = subprocess.CompletedProcess(args, proc.returncode, out, err)
    assert_clean_exit(result, (130,), "interrupted verify")
    # The hashing stops at the next buffer; the rest of the 32 GiB is never read.
    assert stopped_after < 20, f"took {stopped_after:.1f}s to stop"
    assert b"interrupted" in err
    if as_json:
        summary = strict_json(out)["summary"]
        assert summary["interrupted"] is True
        assert summary["bytes_verified"] < summary["bytes_total"]
        assert summary["blobs_verified"] < summary["blobs_total"]
        assert summary["bytes_total"] >= BIG_BLOBS * BIG_SIZE
    else:
        text = out.decode()
        assert "errors" in text and "re-hashed" in text  # the summary line was printed


STARTER = ("import sys; sys.stderr.write('STARTED\\n'); sys.stderr.flush(); "
           "sys.argv[0] = 'regfsck'; import runpy; runpy.run_module('regfsck', run_name='__main__')")


@pytest.mark.parametrize("delay", [0.02, 0.06, 0.12, 0.25, 0.5, 1.0])
def test_sigint_at_any_moment_of_startup_exits_130_quietly(big_tree: tuple[Path, list[Path]],
                                                           delay: float) -> None:
    """From the moment the interpreter hands over to regfsck (imports of typer, rich and
    every command, root resolution, the scan) to the hashing: exit 130, never a traceback;
    any JSON printed is valid and says it was interrupted."""
    root, _big = big_tree
    proc = subprocess.Popen([sys.executable, "-c", STARTER, "verify", str(root), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            env=cli_env())
    try:
        assert proc.stderr is not None
        assert proc.stderr.readline() == b"STARTED\n"
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    assert_clean_exit(result, (130,), f"SIGINT {delay}s after start")
    if out:
        assert strict_json(out)["summary"]["interrupted"] is True


def test_second_sigint_stops_at_once(big_tree: tuple[Path, list[Path]]) -> None:
    """The first Ctrl-C asks for a summary (a huge tree's scan still runs to its end); a
    second one stops at once: exit 130, no traceback, nothing half-printed on stdout."""
    root, big = big_tree
    proc = subprocess.Popen(cli.command("verify", str(root), "--json", "--jobs", "1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            env=cli_env())
    try:
        wait_until_hashing(proc, big)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # If the second SIGINT lands after verify has printed and is exiting, the interpreter
    # dies of it: the shell shows 130 for both.
    assert_clean_exit(subprocess.CompletedProcess(proc.args, proc.returncode, out, err),
                      (130, -signal.SIGINT), "verify after two SIGINTs")
    assert b"Ctrl-C again" in err
    if out:
        assert strict_json(out)["summary"]["interrupted"] is True
