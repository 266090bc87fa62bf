"""A real S3 API server on loopback (moto's server mode) and registries writing into it.

`MotoServer` runs `moto_server -H 127.0.0.1 -p PORT` as a child process; `s3_registry_config`
writes a distribution config whose `storage: s3:` section points the real registry's s3
driver at it. The registry's Go AWS SDK panics when AWS_CA_BUNDLE is set, so every registry
process runs without any AWS_* variable (`registry_env`). `mirror_to_disk` copies a bucket
prefix key for key into a local directory (no empty directories, as on S3) and
`upload_tree` does the opposite with concurrent PUTs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from tests.realtools import free_port

ACCESS_KEY = "regfsck-test-key"
SECRET_KEY = "regfsck-test-secret"
REGION = "us-east-1"


def moto_missing() -> str | None:
    if shutil.which("moto_server") is None:
        return "moto_server not installed (pip install 'moto[server]')"
    try:
        import obstore  # noqa: F401
    except ImportError:
        return "obstore not installed"
    return None


def registry3_binary() -> str | None:
    """The real registry v3 binary (unpacked once per machine), or None."""
    script = Path("/work/shared/bin/unpack-registry3")
    if not script.exists():
        return None
    dest = Path(tempfile.gettempdir()) / "regfsck-registry3"
    proc = subprocess.run([str(script), str(dest)], capture_output=True, text=True, check=False)
    return proc.stdout.strip() if proc.returncode == 0 else None


def registry_env() -> dict[str, str]:
    """The environment for a registry process: no REGISTRY_* and no AWS_* at all."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith("REGISTRY_") and not k.startswith("AWS_")}


class MotoServer:
    """`moto_server` on 127.0.0.1 (a random port); stopped by its own pid on exit."""

    def __init__(self) -> None:
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MotoServer:
        self.port = free_port()
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop)
        self._proc = subprocess.Popen(["moto_server", "-H", "127.0.0.1", "-p", str(self.port)],
                                      stdin=subprocess.DEVNULL, stdout=self._log,
                                      stderr=subprocess.STDOUT, env=registry_env())
        deadline = time.monotonic() + 30
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError("moto_server exited at startup")
            with contextlib.suppress(OSError):
                opener.open(self.endpoint + "/moto-api/", timeout=2).read()
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("moto_server did not start")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> MotoServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- a plain client for setting up and damaging buckets (boto3, test side only)
    def client(self) -> Any:
        import boto3  # type: ignore[import-untyped]
        from botocore.config import Config  # type: ignore[import-untyped]

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name=REGION,
                            config=Config(max_pool_connections=64,
                                          s3={"addressing_style": "path"}))

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def env(self) -> dict[str, str]:
        """The AWS environment regfsck reads to reach this server."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(AWS_ENDPOINT_URL=self.endpoint, AWS_ACCESS_KEY_ID=ACCESS_KEY,
                   AWS_SECRET_ACCESS_KEY=SECRET_KEY, AWS_REGION=REGION)
        return env


def s3_storage_section(endpoint: str, bucket: str, rootdirectory: str, *,
                       path_style: bool = False) -> dict[str, Any]:
    """The driver's parameters. Registry 3 addresses the bucket as a host name
    (BUCKET.127.0.0.1) unless `forcepathstyle` is set; 2.8 uses paths with a regionendpoint."""
    section: dict[str, Any] = {
        "accesskey": ACCESS_KEY, "secretkey": SECRET_KEY, "region": REGION,
        "regionendpoint": endpoint, "bucket": bucket, "rootdirectory": rootdirectory,
        "secure": False, "v4auth": True}
    if path_style:
        section["forcepathstyle"] = True
    return section


def s3_registry_config(path: Path, endpoint: str, bucket: str, rootdirectory: str, *,
                       port: int = 5000, path_style: bool = False, readonly: bool = False) -> Path:
    """A distribution config (2.8 and 3 read it) storing into the bucket through its s3 driver
    (`readonly`: the registry's read-only maintenance mode)."""
    maintenance: dict[str, Any] = {"uploadpurging": {"enabled": False}}
    if readonly:
        maintenance["readonly"] = {"enabled": True}
    config: dict[str, Any] = {
        "version": 0.1,
        "log": {"level": "info", "accesslog": {"disabled": True}},
        "storage": {
            "s3": s3_storage_section(endpoint, bucket, rootdirectory, path_style=path_style),
            "delete": {"enabled": True},
            "maintenance": maintenance,
            "redirect": {"disable": True},
        },
        "http": {"addr": f"127.0.0.1:{port}", "secret": "regfsck-test-secret"},
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


class S3Registry:
    """A real registry (2.8 `docker-registry` or the v3 binary) serving from a bucket."""

    def __init__(self, binary: str, endpoint: str, bucket: str, rootdirectory: str, *,
                 readonly: bool = False, port: int = 0) -> None:
        self.binary = binary
        self.readonly = readonly
        self.wanted_port = port  # 0: a free one
        self.endpoint = endpoint
        self.bucket = bucket
        self.rootdirectory = rootdirectory
        self.port = 0
        self._tmp: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def config_path(self) -> Path:
        assert self._tmp is not None
        return self._tmp / "config.yml"

    def write_config(self, directory: Path) -> Path:
        return s3_registry_config(directory / "config.yml", self.endpoint, self.bucket,
                                  self.rootdirectory, port=self.port,
                                  path_style=self.binary != "docker-registry",
                                  readonly=self.readonly)

    def start(self) -> S3Registry:
        self._tmp = Path(tempfile.mkdtemp(prefix="regfsck-s3-registry-"))
        self.port = self.wanted_port or free_port()
        self.write_config(self._tmp)
        log = open(self._tmp / "registry.log", "wb")  # noqa: SIM115 (closed in stop)
        self._proc = subprocess.Popen([self.binary, "serve", str(self.config_path)],
                                      stdin=subprocess.DEVNULL, stdout=log,
                                      stderr=subprocess.STDOUT, env=registry_env())
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

    def __enter__(self) -> S3Registry:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def garbage_collect(self, *extra: str) -> tuple[int, str]:
        """The official collector against the bucket (runs fine while stopped)."""
        with tempfile.TemporaryDirectory(prefix="regfsck-s3-gc-") as tmp:
            config = self.write_config(Path(tmp))
            proc = subprocess.run([self.binary, "garbage-collect", *extra, str(config)],
                                  stdin=subprocess.DEVNULL, capture_output=True,
                                  env=registry_env(), timeout=600, check=False)
        return proc.returncode, (proc.stdout + proc.stderr).decode(errors="replace")


def iter_keys(client: Any, bucket: str, prefix: str = "") -> Iterator[dict[str, Any]]:
    token: str | None = None
    while True:
        kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
        if token:
            kwargs["ContinuationToken"] = token
        page = client.list_objects_v2(**kwargs)
        yield from page.get("Contents", [])
        if not page.get("IsTruncated"):
            return
        token = page["NextContinuationToken"]


def mirror_to_disk(client: Any, bucket: str, prefix: str, dest: Path) -> Path:
    """Copy every key below `prefix` to `dest/<rest of key>`, key for key."""
    start = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
    for obj in iter_keys(client, bucket, start):
        target = dest / obj["Key"][len(start):]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read())
    return dest


def upload_tree(client: Any, src: Path, bucket: str, prefix: str, *, jobs: int = 32) -> int:
    """PUT every regular file below `src` as `prefix/<relative path>` (concurrently)."""
    start = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
    files = [p for p in src.rglob("*") if p.is_file() and not p.is_symlink()]

    def put(path: Path) -> None:
        client.put_object(Bucket=bucket, Key=start + path.relative_to(src).as_posix(),
                          Body=path.read_bytes())

    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(put, files))
    return len(files)


def clone_bucket(client: Any, src: str, dst: str, *, jobs: int = 32) -> int:
    """A new bucket `dst` holding every key of `src` (server-side copies): a private copy of
    a tree the real registry wrote, free to change."""
    client.create_bucket(Bucket=dst)
    keys = [o["Key"] for o in iter_keys(client, src)]

    def copy(key: str) -> None:
        client.copy_object(Bucket=dst, Key=key, CopySource={"Bucket": src, "Key": key})

    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(copy, keys))
    return len(keys)


def snapshot(client: Any, bucket: str, prefix: str = "") -> dict[str, tuple[str, str]]:
    """key -> (ETag, sha256 of the bytes) of every object below `prefix`."""
    import hashlib

    def one(obj: dict[str, Any]) -> tuple[str, tuple[str, str]]:
        body = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
        return obj["Key"], (obj["ETag"], hashlib.sha256(body).hexdigest())

    with ThreadPoolExecutor(32) as pool:
        return dict(pool.map(one, list(iter_keys(client, bucket, prefix))))
