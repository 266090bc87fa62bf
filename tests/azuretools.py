"""A real Azure Blob server on loopback (Azurite, from npm) and the registry's `azure` driver
writing into it.

Azurite is installed once per machine with npm under the temp dir (as @sigstore/oci is for
the artifact tests); `azurite_missing` says why a test cannot run. Only registry 3 can be the
writer: its azure driver takes `serviceurl` (the account's blob URL, Azurite's
`http://127.0.0.1:PORT/devstoreaccount1`); Debian's docker-registry 2.8.2 is built without
the azure driver at all. Containers are created with a SharedKey-signed request (the
registry does not create its container; no Azure SDK is needed for one call).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from email.utils import formatdate
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from tests.realtools import clean_env, free_port

AZURITE_VERSION = "3.37.0"
ACCOUNT = "devstoreaccount1"  # Azurite's well-known development account and key
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def azurite_bin() -> Path | None:
    """`azurite-blob` from a private node_modules (installed once), or None."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        return None
    base = Path(tempfile.gettempdir()) / f"regfsck-azurite-{os.getuid()}"
    binary = base / "node_modules" / ".bin" / "azurite-blob"
    if not binary.exists():
        base.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--silent",
                               "--prefix", str(base), f"azurite@{AZURITE_VERSION}"],
                              capture_output=True, timeout=900, check=False, env=clean_env())
        if proc.returncode != 0 or not binary.exists():
            return None
    return binary


def azurite_missing() -> str | None:
    if azurite_bin() is None:
        return "Azurite not available (needs node/npm and `npm install azurite`)"
    return None


class Azurite:
    """`azurite-blob` on 127.0.0.1 (a random port, data in a temp dir); stopped by its pid."""

    def __init__(self) -> None:
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmp: str | None = None

    @property
    def endpoint(self) -> str:
        """The account's blob URL (what the driver calls `serviceurl`)."""
        return f"http://127.0.0.1:{self.port}/{ACCOUNT}"

    def start(self) -> Azurite:
        binary = azurite_bin()
        if binary is None:
            raise RuntimeError(azurite_missing() or "no azurite")
        self.port = free_port()
        self._tmp = tempfile.mkdtemp(prefix="regfsck-azurite-data-")
        self._proc = subprocess.Popen(
            [str(binary), "--blobHost", "127.0.0.1", "--blobPort", str(self.port),
             "--location", self._tmp, "--silent", "--skipApiVersionCheck", "--loose"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env=clean_env())
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError("azurite exited at startup")
            try:
                opener.open(f"{self.endpoint}?comp=list", timeout=2)
            except urllib.error.HTTPError:
                return self  # answering (403 without a signature)
            except OSError:
                time.sleep(0.2)
                continue
            return self
        self.stop()
        raise RuntimeError("azurite did not start")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> Azurite:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def make_container(self, name: str) -> str:
        """PUT ?restype=container, signed with the account's SharedKey."""
        headers = {"x-ms-date": formatdate(usegmt=True), "x-ms-version": "2021-08-06"}
        signed = ("PUT\n" + "\n" * 11 + "".join(f"{k}:{v}\n" for k, v in sorted(headers.items()))
                  + f"/{ACCOUNT}/{ACCOUNT}/{name}\nrestype:container")
        mac = hmac.new(base64.b64decode(KEY), signed.encode(), hashlib.sha256).digest()
        request = urllib.request.Request(
            f"{self.endpoint}/{name}?restype=container", method="PUT", data=None,
            headers={**headers, "Content-Length": "0",
                     "Authorization": f"SharedKey {ACCOUNT}:{base64.b64encode(mac).decode()}"})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        opener.open(request, timeout=30).read()
        return name

    def store(self, container: str) -> Any:
        """An obstore client for the test side (mirroring, damaging)."""
        from obstore.store import AzureStore

        return AzureStore(container, config={"account_name": ACCOUNT, "account_key": KEY,
                                             "endpoint": self.endpoint},
                          client_options={"allow_http": True})

    def env(self) -> dict[str, str]:
        """The Azure environment regfsck reads to reach this server."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "AWS_"))}
        env.update(AZURE_STORAGE_ACCOUNT_NAME=ACCOUNT, AZURE_STORAGE_ACCOUNT_KEY=KEY,
                   AZURE_STORAGE_ENDPOINT=self.endpoint)
        return env


def azure_registry_config(path: Path, endpoint: str, container: str, rootdirectory: str, *,
                          port: int) -> Path:
    """A registry 3 config storing into the container through its azure driver."""
    config: dict[str, Any] = {
        "version": 0.1,
        "log": {"level": "info", "accesslog": {"disabled": True}},
        "storage": {
            "azure": {"accountname": ACCOUNT, "accountkey": KEY, "container": container,
                      "serviceurl": endpoint, "rootdirectory": rootdirectory,
                      "credentials": {"type": "shared_key"}},
            "delete": {"enabled": True},
            "maintenance": {"uploadpurging": {"enabled": False}},
            "redirect": {"disable": True},
        },
        "http": {"addr": f"127.0.0.1:{port}", "secret": "regfsck-test-secret"},
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


class AzureRegistry:
    """Registry 3 serving from an Azure container (Azurite)."""

    def __init__(self, binary: str, endpoint: str, container: str, rootdirectory: str) -> None:
        self.binary, self.endpoint = binary, endpoint
        self.container, self.rootdirectory = container, rootdirectory
        self.port = 0
        self._tmp: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def write_config(self, directory: Path) -> Path:
        return azure_registry_config(directory / "config.yml", self.endpoint, self.container,
                                     self.rootdirectory, port=self.port)

    def start(self) -> AzureRegistry:
        self._tmp = Path(tempfile.mkdtemp(prefix="regfsck-az-registry-"))
        self.port = free_port()
        config = self.write_config(self._tmp)
        log = open(self._tmp / "registry.log", "wb")  # noqa: SIM115 (closed below)
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("REGISTRY_", "AWS_", "AZURE_"))}
        self._proc = subprocess.Popen([self.binary, "serve", str(config)], stdin=subprocess.DEVNULL,
                                      stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                text = (self._tmp / "registry.log").read_text(errors="replace")
                self.stop()
                raise RuntimeError(f"registry exited at startup:\n{text[-3000:]}")
            with contextlib.suppress(OSError):
                if opener.open(f"http://{self.host}/v2/", timeout=2).status == 200:
                    return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("registry did not start")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> AzureRegistry:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def garbage_collect(self, *extra: str) -> tuple[int, str]:
        """The official collector against the container."""
        with tempfile.TemporaryDirectory(prefix="regfsck-az-gc-") as tmp:
            config = self.write_config(Path(tmp))
            env = {k: v for k, v in os.environ.items()
                   if not k.startswith(("REGISTRY_", "AWS_", "AZURE_"))}
            proc = subprocess.run([self.binary, "garbage-collect", *extra, str(config)],
                                  stdin=subprocess.DEVNULL, capture_output=True, env=env,
                                  timeout=600, check=False)
        return proc.returncode, (proc.stdout + proc.stderr).decode(errors="replace")


def mirror_to_disk(store: Any, prefix: str, dest: Path) -> Path:
    """Copy every blob below `prefix` to `dest/<rest of name>`, key for key."""
    import obstore

    start = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
    for page in obstore.list(store, start or None, chunk_size=1000):
        for meta in page:
            target = dest / meta["path"][len(start):]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(bytes(obstore.get(store, meta["path"]).bytes()))
    return dest
