"""A registry binary serving a root as its own process (not through tests.realtools'
RealRegistry): started with any argv prefix (setpriv, unshare) and environment, ready once
`/v2/` answers, stopped by its PID."""

from __future__ import annotations

import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path


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
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
