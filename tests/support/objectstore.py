"""Object storage for the tests: real servers on loopback, the real registry writing into them,
and the test side's view of a bucket or container.

One place for what every object-storage test (and bench_s3*) needs, so no test module imports
another one and a server is started, waited for and stopped the same way everywhere:

- servers, each a child process on a free 127.0.0.1 port, ready once it answers HTTP, stopped
  by its own pid (`ChildServer`): `MotoServer` (moto's S3 API server) and `Azurite` (Azure
  Blob, from npm, installed once per machine under the temp dir);
- `BucketRegistry`: the real registry (2.8 `docker-registry` or the v3 binary) serving from a
  bucket (`s3_registry`) or a container (`azure_registry`) through its own driver, and its
  official `garbage-collect` against that storage. The registry's Go AWS SDK panics when
  AWS_CA_BUNDLE is set, so registry processes run without any AWS_*, AZURE_* or REGISTRY_*
  variable (`registry_env`). Only registry 3 has an azure driver (Debian's 2.8.2 lacks it);
- `Bucket` / `Container`: a registry tree below a prefix of a bucket / container, filled by
  the real registry from the session's sample (`push_into_bucket`, `fill_container`: one image
  DELETEd through the API, one upload left open), mirrored to disk key for key (no empty
  directories, as on object storage), cloned to a private copy, snapshotted;
- `differential`: a command on the stored tree and on its disk mirror must give the same JSON
  document (minus `requests`, which only object storage reports) and exit code.

The fixtures live in tests/conftest.py: `moto` and `azurite` (one server per test module),
`bucket28` and `bucket3` (a bucket each registry version filled, per module: `Bucket.clone`
one before changing it).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from email.utils import formatdate
from itertools import count
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self

import pytest
import yaml

from tests import realtools
from tests.realtools import NO_REGISTRY3, registry_binary
from tests.realtools import shared_registry3 as registry3_binary
from tests.support import V2
from tests.support.cli import run as regfsck  # a process each: request counts are per process
from tests.support.served import stop_process

ACCESS_KEY = "regfsck-test-key"
SECRET_KEY = "regfsck-test-secret"
REGION = "us-east-1"
AZURITE_VERSION = "3.37.0"
ACCOUNT = "devstoreaccount1"  # Azurite's well-known development account and key
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
PREFIX = "reg/root"  # where the registry's rootdirectory puts its tree in a bucket/container


# -- what is installed ---------------------------------------------------------------------


def moto_missing() -> str | None:
    if shutil.which("moto_server") is None:
        return "moto_server not installed (pip install 'moto[server]')"
    try:
        import obstore  # noqa: F401
    except ImportError:
        return "obstore not installed"
    return None


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
                              capture_output=True, timeout=900, check=False,
                              env=realtools.clean_env())
        if proc.returncode != 0 or not binary.exists():
            return None
    return binary


def azurite_missing() -> str | None:
    if azurite_bin() is None:
        return "Azurite not available (needs node/npm and `npm install azurite`)"
    return None


def needs_server(test: Any) -> Any:
    """The real registry, skopeo and moto_server: skipped with the reason when absent."""
    for mark in (pytest.mark.realtools,
                 pytest.mark.skipif(bool(realtools.REAL_TOOLS_SKIP_REASON),
                                    reason=realtools.REAL_TOOLS_SKIP_REASON or "-"),
                 pytest.mark.skipif(moto_missing() is not None, reason=moto_missing() or "-")):
        test = mark(test)
    return test


def needs_azure(test: Any) -> Any:
    """The real registry and skopeo (the `azurite` fixture skips when Azurite is absent)."""
    for mark in (pytest.mark.realtools,
                 pytest.mark.skipif(bool(realtools.REAL_TOOLS_SKIP_REASON),
                                    reason=realtools.REAL_TOOLS_SKIP_REASON or "-")):
        test = mark(test)
    return test


def registry_env() -> dict[str, str]:
    """The environment for a registry process: no REGISTRY_*, AWS_* or AZURE_* at all."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("REGISTRY_", "AWS_", "AZURE_"))}


def dead_url() -> str:
    """A registry URL nothing listens on: a stopped registry (tests start one there later)."""
    return f"http://127.0.0.1:{realtools.free_port()}"


def _opener() -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


# -- servers ---------------------------------------------------------------------------------


class ChildServer:
    """A child process serving HTTP on 127.0.0.1 (a free port unless one is asked for), with
    a private temp dir (its log, its data); ready once `answers` says so; stopped by its pid."""

    name = "server"
    startup = 30.0  # seconds

    def __init__(self, port: int = 0) -> None:
        self.wanted_port = port
        self.port = 0
        self.tmp: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        raise NotImplementedError

    def answers(self, opener: urllib.request.OpenerDirector) -> bool:
        """One readiness probe; an OSError means: not yet."""
        raise NotImplementedError

    def start(self) -> Self:
        self.tmp = Path(tempfile.mkdtemp(prefix=f"regfsck-{self.name}-"))
        self.port = self.wanted_port or realtools.free_port()
        argv = self.argv()
        with open(self.tmp / "server.log", "wb") as log:
            self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, env=self.child_env())
        opener = _opener()
        deadline = time.monotonic() + self.startup
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                text = (self.tmp / "server.log").read_text(errors="replace")
                self.stop()
                raise RuntimeError(f"{self.name} exited at startup:\n{text[-3000:]}")
            with contextlib.suppress(OSError):
                if self.answers(opener):
                    return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name} did not start")

    def child_env(self) -> dict[str, str]:
        """The server process's environment (servers never see the tests' credentials)."""
        return registry_env()

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        stop_process(proc)
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class MotoServer(ChildServer):
    """`moto_server` (an S3 API server, state in memory)."""

    name = "moto"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        return ["moto_server", "-H", "127.0.0.1", "-p", str(self.port)]

    def answers(self, opener: urllib.request.OpenerDirector) -> bool:
        opener.open(self.endpoint + "/moto-api/", timeout=2).read()
        return True

    def client(self) -> Any:
        """A plain client for setting up and damaging buckets (boto3, test side only)."""
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


# moto takes CopyObject of any size (it holds objects in memory and never checks S3's 5 GiB
# limit for a copy source; nor does UploadPartCopy check a part's 5 GiB), and a >5 GiB object
# is beyond this machine's memory for moto anyway. This child runs moto_server with S3's
# refusal added at a limit read from a file (absent: no limit), so a test can set it after
# the registry pushed its images: CopyObject of a larger source and UploadPartCopy of a larger
# range get S3's own error.
_LIMITED_MOTO = """
import os, sys
from moto.s3 import models
from moto.s3.exceptions import S3ClientError

LIMIT_FILE = sys.argv[1]

def limit():
    try:
        with open(LIMIT_FILE) as handle:
            return int(handle.read())
    except (FileNotFoundError, ValueError):
        return None

def refuse(size):
    found = limit()
    if found is not None and size > found:
        raise S3ClientError("InvalidRequest", "The specified copy source is larger than the "
                            f"maximum allowable size for a copy source: {found}")

copy_object = models.S3Backend.copy_object
def limited_copy_object(self, src_key, *args, **kwargs):
    refuse(src_key.size)
    return copy_object(self, src_key, *args, **kwargs)

upload_part_copy = models.S3Backend.upload_part_copy
def limited_upload_part_copy(self, *args, **kwargs):
    start, end = kwargs.get("start_byte"), kwargs.get("end_byte")
    if start is None:
        key = self.get_object(kwargs["src_bucket_name"], kwargs["src_key_name"])
        refuse(key.size if key is not None else 0)
    else:
        refuse(end - start + 1)
    return upload_part_copy(self, *args, **kwargs)

models.S3Backend.copy_object = limited_copy_object
models.S3Backend.upload_part_copy = limited_upload_part_copy
from moto.server import main
main(sys.argv[2:])
"""


class LimitedMotoServer(MotoServer):
    """moto_server refusing copies above a limit the test sets (`limit_copies`), as S3
    refuses CopyObject of a source above 5 GiB (InvalidRequest)."""

    name = "moto-limited"

    @property
    def limit_file(self) -> Path:
        assert self.tmp is not None
        return self.tmp / "copy-limit"

    def argv(self) -> list[str]:
        import sys

        return [sys.executable, "-c", _LIMITED_MOTO, str(self.limit_file),
                "-H", "127.0.0.1", "-p", str(self.port)]

    def limit_copies(self, size: int | None) -> None:
        """Refuse copies of more than `size` bytes from now on (None: no limit)."""
        if size is None:
            self.limit_file.unlink(missing_ok=True)
        else:
            self.limit_file.write_text(str(size))


class Azurite(ChildServer):
    """`azurite-blob` (Azure Blob Storage, data in the server's temp dir)."""

    name = "azurite"
    startup = 60.0

    @property
    def endpoint(self) -> str:
        """The account's blob URL (what the registry's azure driver calls `serviceurl`)."""
        return f"http://127.0.0.1:{self.port}/{ACCOUNT}"

    def argv(self) -> list[str]:
        binary = azurite_bin()
        if binary is None:
            raise RuntimeError(azurite_missing() or "no azurite")
        assert self.tmp is not None
        (self.tmp / "data").mkdir()
        return [str(binary), "--blobHost", "127.0.0.1", "--blobPort", str(self.port),
                "--location", str(self.tmp / "data"), "--silent", "--skipApiVersionCheck",
                "--loose"]

    def child_env(self) -> dict[str, str]:
        return realtools.clean_env()

    def answers(self, opener: urllib.request.OpenerDirector) -> bool:
        try:
            opener.open(f"{self.endpoint}?comp=list", timeout=2)
        except urllib.error.HTTPError:
            return True  # answering (403 without a signature)
        return True

    def make_container(self, name: str) -> str:
        """PUT ?restype=container, signed with the account's SharedKey (the registry does not
        create its container; no Azure SDK is needed for one call)."""
        headers = {"x-ms-date": formatdate(usegmt=True), "x-ms-version": "2021-08-06"}
        signed = ("PUT\n" + "\n" * 11 + "".join(f"{k}:{v}\n" for k, v in sorted(headers.items()))
                  + f"/{ACCOUNT}/{ACCOUNT}/{name}\nrestype:container")
        mac = hmac.new(base64.b64decode(KEY), signed.encode(), hashlib.sha256).digest()
        request = urllib.request.Request(
            f"{self.endpoint}/{name}?restype=container", method="PUT", data=None,
            headers={**headers, "Content-Length": "0",
                     "Authorization": f"SharedKey {ACCOUNT}:{base64.b64encode(mac).decode()}"})
        _opener().open(request, timeout=30).read()
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


# -- the real registry on object storage -------------------------------------------------------


def s3_storage_section(endpoint: str, bucket: str, rootdirectory: str, *,
                       path_style: bool = False) -> dict[str, Any]:
    """The s3 driver's parameters. Registry 3 addresses the bucket as a host name
    (BUCKET.127.0.0.1) unless `forcepathstyle` is set; 2.8 uses paths with a regionendpoint."""
    section: dict[str, Any] = {
        "accesskey": ACCESS_KEY, "secretkey": SECRET_KEY, "region": REGION,
        "regionendpoint": endpoint, "bucket": bucket, "rootdirectory": rootdirectory,
        "secure": False, "v4auth": True}
    if path_style:
        section["forcepathstyle"] = True
    return section


def azure_storage_section(endpoint: str, container: str, rootdirectory: str) -> dict[str, Any]:
    """The azure driver's parameters (`serviceurl`: Azurite's account URL)."""
    return {"accountname": ACCOUNT, "accountkey": KEY, "container": container,
            "serviceurl": endpoint, "rootdirectory": rootdirectory,
            "credentials": {"type": "shared_key"}}


def registry_config(path: Path, driver: str, section: dict[str, Any], *, port: int = 5000,
                    readonly: bool = False) -> Path:
    """A distribution config (2.8 and 3 read it) storing through the `driver` (`readonly`:
    the registry's read-only maintenance mode)."""
    maintenance: dict[str, Any] = {"uploadpurging": {"enabled": False}}
    if readonly:
        maintenance["readonly"] = {"enabled": True}
    config: dict[str, Any] = {
        "version": 0.1,
        "log": {"level": "info", "accesslog": {"disabled": True}},
        "storage": {
            driver: section,
            "delete": {"enabled": True},
            "maintenance": maintenance,
            "redirect": {"disable": True},
        },
        "http": {"addr": f"127.0.0.1:{port}", "secret": "regfsck-test-secret"},
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def s3_registry_config(path: Path, endpoint: str, bucket: str, rootdirectory: str, *,
                       port: int = 5000, path_style: bool = False, readonly: bool = False) -> Path:
    return registry_config(path, "s3", s3_storage_section(endpoint, bucket, rootdirectory,
                                                          path_style=path_style),
                           port=port, readonly=readonly)


class BucketRegistry(ChildServer):
    """A real registry binary serving from object storage through its `driver`."""

    name = "registry"

    def __init__(self, binary: str, driver: str, section: dict[str, Any], *,
                 readonly: bool = False, port: int = 0) -> None:
        super().__init__(port)
        self.binary, self.driver, self.section, self.readonly = binary, driver, section, readonly

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def write_config(self, directory: Path) -> Path:
        return registry_config(directory / "config.yml", self.driver, self.section,
                               port=self.port, readonly=self.readonly)

    def argv(self) -> list[str]:
        assert self.tmp is not None
        return [self.binary, "serve", str(self.write_config(self.tmp))]

    def answers(self, opener: urllib.request.OpenerDirector) -> bool:
        return bool(opener.open(f"http://{self.host}/v2/", timeout=2).status == 200)

    def garbage_collect(self, *extra: str) -> tuple[int, str]:
        """The official collector against the storage (runs fine while stopped)."""
        with tempfile.TemporaryDirectory(prefix="regfsck-store-gc-") as tmp:
            config = self.write_config(Path(tmp))
            proc = subprocess.run([self.binary, "garbage-collect", *extra, str(config)],
                                  stdin=subprocess.DEVNULL, capture_output=True,
                                  env=registry_env(), timeout=600, check=False)
        return proc.returncode, (proc.stdout + proc.stderr).decode(errors="replace")


def s3_registry(binary: str, endpoint: str, bucket: str, rootdirectory: str, *,
                readonly: bool = False, port: int = 0) -> BucketRegistry:
    """The registry on a bucket (path-style addressing for v3, as 2.8 always does)."""
    section = s3_storage_section(endpoint, bucket, rootdirectory,
                                 path_style=binary != realtools.REGISTRY_BIN)
    return BucketRegistry(binary, "s3", section, readonly=readonly, port=port)


def azure_registry(binary: str, endpoint: str, container: str, rootdirectory: str, *,
                   readonly: bool = False, port: int = 0) -> BucketRegistry:
    """Registry 3 on an Azure container (Azurite)."""
    return BucketRegistry(binary, "azure", azure_storage_section(endpoint, container,
                                                                 rootdirectory),
                          readonly=readonly, port=port)


def registry_api(host: str) -> realtools.RealRegistry:
    """RealRegistry's API helpers (tags, manifests) for a registry running elsewhere."""
    api = realtools.RealRegistry("/nonexistent-regfsck-root")
    api.port = int(host.rsplit(":", 1)[1])
    return api


def fill(src_root: Path, dst_host: str, seed: str) -> set[str]:
    """Copy the sample's images (schema1 `legacy/` left out: registry 3 refuses it) from a
    filesystem registry on `src_root` into the registry at `dst_host`; push one more image
    and DELETE it through the API; leave one upload unfinished. Returns the blobs only the
    deleted image used (what gc must remove)."""
    opener = _opener()
    with realtools.RealRegistry(src_root) as src, \
            tempfile.TemporaryDirectory(prefix="regfsck-store-layout-") as tmp:
        for repo in src.catalog():
            if repo.startswith("legacy/"):
                continue
            for tag in src.tags(repo):
                realtools.skopeo_copy(f"docker://{src.host}/{repo}:{tag}",
                                      f"docker://{dst_host}/{repo}:{tag}", "--all",
                                      "--preserve-digests")
        lay = realtools.OCILayoutWriter(Path(tmp) / "layout")
        layer = lay.add_layer({"doomed.bin": realtools.pseudo_random_bytes(seed, 20000)})
        image = lay.add_image([layer], tag="doomed", history=["ADD doomed"])
        realtools.skopeo_copy(lay.ref("doomed"), f"docker://{dst_host}/gone/app:doomed",
                              "--preserve-digests")
        request = urllib.request.Request(
            f"http://{dst_host}/v2/gone/app/manifests/{image['digest']}", method="DELETE")
        assert opener.open(request, timeout=30).status == 202
        doc = json.loads(lay.read_blob(image["digest"]))
    upload = urllib.request.Request(f"http://{dst_host}/v2/a/b/blobs/uploads/", data=b"",
                                    method="POST")
    assert opener.open(upload, timeout=30).status == 202
    return {image["digest"], doc["config"]["digest"], *(d["digest"] for d in doc["layers"])}


# -- the test side's view of a stored tree ------------------------------------------------------


class StoredTree(Protocol):
    """What `run_json` and `differential` need of a bucket or container."""

    @property
    def url(self) -> str: ...
    def env(self) -> dict[str, str]: ...
    def mirror(self, dest: Path) -> Path: ...


_COPIES = count(1)


def _fan(digest: str) -> tuple[str, str]:
    hex_part = digest.split(":", 1)[1]
    return hex_part[:2], hex_part


@dataclass
class Bucket:
    """A registry tree below `prefix` of an S3 bucket on a moto server."""

    moto: MotoServer
    name: str
    prefix: str
    binary: str
    doomed_blobs: set[str] = field(default_factory=set)  # blobs only the deleted image used

    @property
    def url(self) -> str:
        return f"s3://{self.name}/{self.prefix}"

    def env(self) -> dict[str, str]:
        return self.moto.env()

    def client(self) -> Any:
        return self.moto.client()

    def key(self, rel: str) -> str:
        """The key of `rel` (a path below docker/registry/v2/)."""
        return f"{self.prefix}/{V2}/{rel}" if self.prefix else f"{V2}/{rel}"

    def blob_key(self, digest: str) -> str:
        return self.key("blobs/sha256/{}/{}/data".format(*_fan(digest)))

    def read(self, key: str) -> bytes:
        return bytes(self.client().get_object(Bucket=self.name, Key=key)["Body"].read())

    def mirror(self, dest: Path) -> Path:
        return mirror_to_disk(self.client(), self.name, self.prefix, dest)

    def registry(self, *, readonly: bool = False, port: int = 0,
                 binary: str | None = None) -> BucketRegistry:
        return s3_registry(binary or self.binary, self.moto.endpoint, self.name,
                           "/" + self.prefix, readonly=readonly, port=port)

    def clone(self, name: str | None = None) -> Bucket:
        """A private copy (a new bucket, server-side copies of every key), free to change."""
        name = name or f"{self.name}-c{next(_COPIES)}"
        clone_bucket(self.client(), self.name, name)
        return Bucket(self.moto, name, self.prefix, self.binary, set(self.doomed_blobs))

    def keys_below(self, rel: str) -> list[str]:
        """The keys below `prefix/rel` (rel relative to the prefix, not to v2)."""
        start = f"{self.prefix}/{rel}" if self.prefix else rel
        return [o["Key"] for o in iter_keys(self.client(), self.name, start)]

    def tree(self) -> dict[str, tuple[str, str]]:
        """Every key of the registry's tree (below PREFIX/docker/registry/v2/), with its bytes."""
        return snapshot(self.client(), self.name, self.key(""))

    def everything(self) -> dict[str, tuple[str, str]]:
        """Every key of the bucket (the tree, regfsck's state and quarantine, anything else)."""
        return snapshot(self.client(), self.name)

    def tags(self) -> dict[str, list[str]]:
        """repo -> tags, read from the tree's tag `current/link` keys."""
        return tags_of_keys(self.keys_below(f"{V2}/repositories/"))

    def image_layers(self, repo: str, tag: str) -> list[dict[str, Any]]:
        """The layer descriptors of the image `repo:tag` points at."""
        digest = self.read(self.key(f"repositories/{repo}/_manifests/tags/{tag}/current/link"))
        layers: list[dict[str, Any]] = json.loads(self.read(self.blob_key(digest.decode())))[
            "layers"]
        return layers

    def serves_every_tag(self, binary: str, expected: dict[str, list[str]]) -> None:
        """A fresh registry of `binary` on the bucket serves each repo:tag."""
        serves_every_tag(self.registry(binary=binary), expected)


def tags_of_keys(keys: list[str]) -> dict[str, list[str]]:
    """repo -> tags, from the tag `current/link` keys among `keys` (below repositories/)."""
    found: dict[str, list[str]] = {}
    below = f"{V2}/repositories/"
    for key in keys:
        rel = key.split(below, 1)[1]
        if "/_manifests/tags/" in rel and rel.endswith("/current/link"):
            repo, _, rest = rel.partition("/_manifests/tags/")
            found.setdefault(repo, []).append(rest.split("/")[0])
    return {repo: sorted(tags) for repo, tags in found.items()}


def serves_every_tag(registry: BucketRegistry, expected: dict[str, list[str]]) -> None:
    """The registry (started here) serves each repo:tag (skopeo copy --all checks every
    digest on the way into a dir: layout) and lists every repository."""
    with registry as reg, tempfile.TemporaryDirectory(prefix="regfsck-stored-pull-") as tmp:
        for repo, tags in sorted(expected.items()):
            for tag in tags:
                dest = Path(tmp) / f"{repo.replace('/', '_')}-{tag}"
                realtools.skopeo_copy(f"docker://{reg.host}/{repo}:{tag}", f"dir:{dest}",
                                      "--all")
        served = json.loads(_opener().open(f"http://{reg.host}/v2/_catalog",
                                           timeout=30).read())
        assert set(expected) <= set(served["repositories"])


def blob_digests(snap: dict[str, tuple[str, str]]) -> set[str]:
    """The blobs (`sha256:...`) a snapshot's keys hold."""
    return {"sha256:" + k.split("/")[-2] for k in snap if "/blobs/sha256/" in k}


def push_into_bucket(moto: MotoServer, sample_root: Path, version: str, name: str) -> Bucket:
    """A new bucket the real registry of `version` ("2.8", "3") filled from the sample
    (`fill`); the test skips when that registry is absent."""
    binary = registry_binary(version)
    moto.make_bucket(name)
    bucket = Bucket(moto, name, PREFIX, binary)
    with bucket.registry() as dst:
        bucket.doomed_blobs = fill(sample_root, dst.host, "s3-doomed")
    return bucket


@dataclass
class Container:
    """A registry tree below `prefix` of an Azure container on Azurite."""

    server: Azurite
    name: str
    binary: str
    doomed_blobs: set[str] = field(default_factory=set)
    prefix: str = PREFIX

    @property
    def url(self) -> str:
        return f"azure://{self.name}/{self.prefix}"

    def env(self) -> dict[str, str]:
        return self.server.env()

    def store(self) -> Any:
        return self.server.store(self.name)

    def key(self, rel: str) -> str:
        return f"{self.prefix}/{V2}/{rel}"

    def mirror(self, dest: Path) -> Path:
        return mirror_container(self.store(), self.prefix, dest)

    def registry(self, *, readonly: bool = False, port: int = 0) -> BucketRegistry:
        return azure_registry(self.binary, self.server.endpoint, self.name, "/" + self.prefix,
                              readonly=readonly, port=port)

    def keys_below(self, rel: str) -> list[str]:
        """The blob names starting with `prefix/rel` (rel relative to the prefix, not to v2),
        as an S3 key prefix means: obstore lists below a "directory", so its parent is
        listed (a blob named exactly `prefix/rel`, as the lock, is found too)."""
        import obstore

        start = f"{self.prefix}/{rel}"
        parent = start.rstrip("/").rpartition("/")[0]
        return sorted(m["path"] for page in obstore.list(self.store(), parent, chunk_size=1000)
                      for m in page if m["path"].startswith(start))

    def tags(self) -> dict[str, list[str]]:
        return tags_of_keys(self.keys_below(f"{V2}/repositories/"))

    def tree(self) -> dict[str, tuple[str, str]]:
        """Every blob of the registry's tree (below PREFIX/docker/registry/v2/): name ->
        (ETag, sha256 of the bytes)."""
        return self.snapshot(self.key(""))

    def everything(self) -> dict[str, tuple[str, str]]:
        return self.snapshot("")

    def snapshot(self, start: str) -> dict[str, tuple[str, str]]:
        import obstore

        store = self.store()
        metas = [m for page in obstore.list(store, start or None, chunk_size=1000) for m in page]

        def one(meta: Any) -> tuple[str, tuple[str, str]]:
            body = bytes(obstore.get(store, meta["path"]).bytes())
            return meta["path"], (str(meta["e_tag"]), hashlib.sha256(body).hexdigest())

        with ThreadPoolExecutor(16) as pool:
            return dict(pool.map(one, metas))

    def serves_every_tag(self, expected: dict[str, list[str]]) -> None:
        serves_every_tag(self.registry(), expected)

    def clone(self, name: str) -> Container:
        """A private copy (a new container holding every blob), free to change."""
        import obstore

        copy = Container(self.server, self.server.make_container(name), self.binary,
                         set(self.doomed_blobs), self.prefix)
        src, dst = self.store(), copy.store()
        names = [m["path"] for page in obstore.list(src, None, chunk_size=1000) for m in page]
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda p: obstore.put(dst, p, bytes(obstore.get(src, p).bytes())),
                          names))
        return copy

    def etags(self) -> dict[str, Any]:
        """name -> ETag of every blob of the container."""
        import obstore

        return {m["path"]: m["e_tag"] for page in obstore.list(self.store(), None, chunk_size=1000)
                for m in page}


def fill_container(azurite: Azurite, sample_root: Path, name: str) -> Container:
    """A new container registry 3 filled from the sample (`fill`); skips without v3 (Debian's
    2.8.2 has no azure driver)."""
    binary = registry3_binary()
    if binary is None:
        pytest.skip(NO_REGISTRY3 + "; Debian's 2.8.2 has no azure driver")
    box = Container(azurite, azurite.make_container(name), binary)
    with box.registry() as dst:
        box.doomed_blobs = fill(sample_root, dst.host, "az-doomed")
    return box


def run_json(tree: StoredTree, *args: str) -> tuple[int, dict[str, Any]]:
    """regfsck `args --json` with the tree's credentials: exit code and document."""
    proc = regfsck(*args, "--json", env=tree.env())
    assert proc.stdout, proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def without_requests(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k != "requests"}


def differential(tree: StoredTree, disk: Path, *args: str, ref: str | None = None
                 ) -> dict[str, Any]:
    """Run `args` on the stored tree and on its key-for-key mirror `disk` (made there first
    unless it exists; `ref`, if any, after the root): the documents and exit codes must be
    the same; only the stored run reports `requests` (some). Returns the stored run's."""
    if not disk.exists():
        tree.mirror(disk)
    tail = [ref] if ref is not None else []
    code_store, on_store = run_json(tree, *args, tree.url, *tail)
    code_disk, on_disk = run_json(tree, *args, str(disk), *tail)
    assert "requests" in on_store and on_store["requests"]["total"] > 0, args
    assert "requests" not in on_disk, args
    assert without_requests(on_store) == on_disk, args
    assert code_store == code_disk, args
    return on_store


# -- keys of a bucket (boto3) and blobs of a container (obstore) -------------------------------


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


def _start(prefix: str) -> str:
    return f"{prefix.strip('/')}/" if prefix.strip("/") else ""


def mirror_to_disk(client: Any, bucket: str, prefix: str, dest: Path) -> Path:
    """Copy every key below `prefix` to `dest/<rest of key>`, key for key."""
    start = _start(prefix)
    for obj in iter_keys(client, bucket, start):
        target = dest / obj["Key"][len(start):]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read())
    return dest


def mirror_container(store: Any, prefix: str, dest: Path) -> Path:
    """Copy every blob below `prefix` to `dest/<rest of name>`, key for key."""
    import obstore

    start = _start(prefix)
    for page in obstore.list(store, start or None, chunk_size=1000):
        for meta in page:
            target = dest / meta["path"][len(start):]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(bytes(obstore.get(store, meta["path"]).bytes()))
    return dest


def _parallel(jobs: int, work: Callable[[Any], None], items: list[Any]) -> None:
    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(work, items))


def upload_tree(client: Any, src: Path, bucket: str, prefix: str, *, jobs: int = 32) -> int:
    """PUT every regular file below `src` as `prefix/<relative path>` (concurrently)."""
    start = _start(prefix)
    files = [p for p in src.rglob("*") if p.is_file() and not p.is_symlink()]
    _parallel(jobs, lambda path: client.put_object(
        Bucket=bucket, Key=start + path.relative_to(src).as_posix(), Body=path.read_bytes()),
        files)
    return len(files)


def clone_bucket(client: Any, src: str, dst: str, *, jobs: int = 32) -> int:
    """A new bucket `dst` holding every key of `src` (server-side copies): a private copy of
    a tree the real registry wrote, free to change."""
    client.create_bucket(Bucket=dst)
    keys = [o["Key"] for o in iter_keys(client, src)]
    _parallel(jobs, lambda key: client.copy_object(Bucket=dst, Key=key,
                                                   CopySource={"Bucket": src, "Key": key}), keys)
    return len(keys)


def snapshot(client: Any, bucket: str, prefix: str = "") -> dict[str, tuple[str, str]]:
    """key -> (ETag, sha256 of the bytes) of every object below `prefix`."""

    def one(obj: dict[str, Any]) -> tuple[str, tuple[str, str]]:
        body = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
        return obj["Key"], (obj["ETag"], hashlib.sha256(body).hexdigest())

    with ThreadPoolExecutor(32) as pool:
        return dict(pool.map(one, list(iter_keys(client, bucket, prefix))))
