"""A registry binary serving a root as its own process (not through tests.realtools'
RealRegistry): started with any argv prefix (setpriv, unshare) and environment, ready once
`/v2/` answers, stopped by its PID; `stop_process`, how every server a test starts (this one,
RealRegistry, tests.support.objectstore's) is stopped."""

from __future__ import annotations

import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path


def stop_process(proc: subprocess.Popen[bytes] | None) -> None:
    """Terminate a child by its PID; kill it if it has not exited 10 s later."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


class Served:
    """A real registry binary serving a root; stopped by its PID."""

    def __init__(self, args: list[str], port: int, env: dict[str, str], cwd: Path) -> None:
        self.port = port
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT, env=env, cwd=cwd)
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise AssertionError(f"registry exited: {self.log.read()[-2000:]!r}")
            try:
                with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                        f"http://127.0.0.1:{port}/v2/", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            assert time.monotonic() < deadline, "registry did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        stop_process(self.proc)
        self.log.close()
