"""Harness around the real ``docker-registry`` (distribution 2.8) and ``skopeo`` binaries.

Everything runs locally: a registry is started on 127.0.0.1 with a throw-away config, images are
crafted byte-for-byte in an OCI layout (deterministic tars, fixed timestamps) and pushed with
skopeo or the registry HTTP API. ``build_sample_registry`` builds the small data directory that
is shipped as ``fixtures/registry``. Only the standard library and pyyaml are used (zstandard is
imported lazily for zstd layers).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gzip
import hashlib
import io
import json
import os
import random
import re
import shutil
import socket
import subprocess
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from email.message import Message
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import yaml

from tests.support.served import stop_process

REGISTRY_BIN = "docker-registry"
SKOPEO_BIN = "skopeo"

# Media types.
MT_DOCKER_V2 = "application/vnd.docker.distribution.manifest.v2+json"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MT_DOCKER_V1 = "application/vnd.docker.distribution.manifest.v1+json"
MT_DOCKER_V1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_OCI_EMPTY = "application/vnd.oci.empty.v1+json"
MT_OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
MT_OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MT_OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
MANIFEST_ACCEPT = (
    MT_OCI_INDEX,
    MT_OCI_MANIFEST,
    MT_DOCKER_LIST,
    MT_DOCKER_V2,
    MT_DOCKER_V1_SIGNED,
    MT_DOCKER_V1,
)
EMPTY_JSON = b"{}"
EMPTY_JSON_DIGEST = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
FIXED_CREATED = "2024-01-01T00:00:00Z"
FIXED_MTIME = 1704067200  # 2024-01-01T00:00:00Z

Compression = Literal["gzip", "zstd", "none"]
Descriptor = dict[str, Any]


# --------------------------------------------------------------------------- availability


def real_tools_missing() -> str | None:
    """Return why the real tools cannot be used, or None when they all are available."""
    missing = [b for b in (REGISTRY_BIN, SKOPEO_BIN) if shutil.which(b) is None]
    if missing:
        return "real tools not installed: " + ", ".join(missing)
    for module in ("zstandard", "cryptography", "oras"):  # zstd layers, signatures, artifacts
        try:
            __import__(module)
        except ImportError:
            return f"python package {module!r} not installed"
    return None


def have_real_tools() -> bool:
    """True when docker-registry and skopeo (and zstandard) are available."""
    return real_tools_missing() is None


REAL_TOOLS_SKIP_REASON = real_tools_missing() or ""

# `../shared/bin/unpack-registry3` seen from the checkout (or from a clone one level deeper).
UNPACK_REGISTRY3 = next((p / "shared" / "bin" / "unpack-registry3"
                         for p in Path(__file__).resolve().parents[2:4]
                         if (p / "shared" / "bin" / "unpack-registry3").is_file()),
                        Path(__file__).resolve().parents[2] / "shared" / "bin" / "unpack-registry3")


def registry3_binary(dest_dir: Path | str) -> str | None:
    """Unpack the real registry v3 binary into ``dest_dir``; None when it is not available
    (a machine without ``../shared/bin/unpack-registry3``: callers skip with a reason)."""
    script = Path(os.environ.get("REGFSCK_UNPACK_REGISTRY3", str(UNPACK_REGISTRY3)))
    if not script.is_file():
        return None
    out = Path(dest_dir) / "registry3"
    proc = subprocess.run([str(script), str(out)], capture_output=True, check=False)
    return str(out) if proc.returncode == 0 and out.is_file() else None


@functools.cache
def shared_registry3() -> str | None:
    """The real registry v3 binary unpacked once per user (under the temp dir) and process,
    or None when this machine has none."""
    dest = Path(tempfile.gettempdir()) / f"regfsck-registry3-{os.getuid()}"
    dest.mkdir(parents=True, exist_ok=True)
    return registry3_binary(dest)


NO_REGISTRY3 = "registry v3 binary not available (../shared/bin/unpack-registry3)"


def registry_binary(version: str) -> str:
    """The real registry of `version` ("2.8" or "3"); the calling test skips when v3 is absent."""
    if version == "2.8":
        return REGISTRY_BIN
    binary = shared_registry3()
    if binary is None:
        import pytest

        pytest.skip(NO_REGISTRY3)
    return binary


def clean_env() -> dict[str, str]:
    """The current environment without ``REGISTRY_*`` overrides and ``AWS_CA_BUNDLE``."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("REGISTRY_") and k != "AWS_CA_BUNDLE"
    }


def sha256_digest(data: bytes) -> str:
    """``sha256:<hex>`` of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _first_ephemeral_port() -> int:
    """The lowest port the kernel hands out itself (to every outgoing connection, and to a
    bind of port 0); Linux's usual one where /proc does not say."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A free TCP port on 127.0.0.1 that stays free until a server binds it: one below the
    kernel's ephemeral range. A port of that range (what binding port 0 gives) is free
    when picked, but any outgoing connection may then take it as its local port, as an
    S3 client's pooled connection to moto does for the rest of a test: a registry
    started on it seconds later (`objectstore.dead_url`: a registry started midway
    through a run) could not bind it."""
    below = range(1024, max(_first_ephemeral_port(), 1025))
    for port in random.sample(below, min(200, len(below))):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # all taken: the kernel's pick
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RealToolError(RuntimeError):
    """A real tool (registry, GC, skopeo) or a registry API call failed."""


# --------------------------------------------------------------------------- registry


@dataclasses.dataclass
class HTTPResponse:
    """Status, headers and body of one registry API call."""

    status: int
    headers: Message  # case-insensitive
    body: bytes


def write_registry_config(
    path: Path, root: Path, *, port: int = 5000, schema1: bool = True, log_level: str = "info",
    allow_urls: bool = False,
) -> Path:
    """Write a distribution 2.8 config for a filesystem store at ``root`` to ``path``.

    ``allow_urls``: accept descriptors carrying ``urls`` (both registries refuse them by
    default); the same file serves registry v3."""
    config: dict[str, Any] = {
        "version": 0.1,
        "log": {"level": log_level, "accesslog": {"disabled": True}},
        "storage": {
            "filesystem": {"rootdirectory": str(root)},
            "delete": {"enabled": True},
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        "http": {"addr": f"127.0.0.1:{port}", "secret": "regfsck-test-secret"},
    }
    if schema1:
        config["compatibility"] = {"schema1": {"enabled": True}}
    if allow_urls:
        config["validation"] = {"manifests": {"urls": {"allow": ["^https?://"]}}}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


class RealRegistry:
    """A ``docker-registry serve`` process on 127.0.0.1 storing into ``root``.

    Use as a context manager; the config and log live in a private temp dir removed on exit.
    """

    def __init__(
        self, root: Path | str, *, schema1: bool = True, start_timeout: float = 20.0,
        binary: str = REGISTRY_BIN, allow_urls: bool = False,
    ) -> None:
        self.root = Path(root).resolve()
        self.binary = binary  # registry v3: `registry3_binary(...)`
        self.allow_urls = allow_urls
        self.schema1 = schema1 and binary == REGISTRY_BIN  # v3 refuses the schema1 section
        self.start_timeout = start_timeout
        self.port = 0
        self._tmp: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    # -- lifecycle

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://{self.host}"

    @property
    def config_path(self) -> Path:
        """Path of the generated config file (valid while started)."""
        if self._tmp is None:
            raise RealToolError("registry not started")
        return self._tmp / "config.yml"

    @property
    def log_path(self) -> Path:
        """Path of the registry's combined stdout/stderr log."""
        if self._tmp is None:
            raise RealToolError("registry not started")
        return self._tmp / "registry.log"

    def log(self) -> str:
        """The registry log so far (empty if unavailable)."""
        try:
            return self.log_path.read_text(errors="replace")
        except (OSError, RealToolError):
            return ""

    def start(self) -> RealRegistry:
        """Write the config, start the process and wait until ``GET /v2/`` answers 200.

        Retries with a new port if another process grabbed the chosen one meanwhile.
        """
        if self._proc is not None:
            raise RealToolError("registry already started")
        self.root.mkdir(parents=True, exist_ok=True)
        for attempt in range(3):
            try:
                return self._start_once()
            except RealToolError as err:
                if "address already in use" not in str(err) or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _start_once(self) -> RealRegistry:
        self._tmp = Path(tempfile.mkdtemp(prefix="regfsck-registry-"))
        self.port = free_port()
        write_registry_config(self.config_path, self.root, port=self.port, schema1=self.schema1,
                              allow_urls=self.allow_urls)
        with open(self.log_path, "wb") as log:
            proc = subprocess.Popen(
                [self.binary, "serve", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=clean_env(),
            )
        self._proc = proc
        deadline = time.monotonic() + self.start_timeout
        while True:
            if proc.poll() is not None:
                log_text = self.log()
                self._proc = None
                self._cleanup()
                raise RealToolError(
                    f"docker-registry exited with {proc.returncode} at startup:\n{log_text}"
                )
            with contextlib.suppress(OSError):
                if self.request("GET", "/v2/", timeout=2).status == 200:
                    return self
            if time.monotonic() > deadline:
                log_text = self.log()
                self.stop()
                raise RealToolError(
                    f"docker-registry on {self.host} not ready after {self.start_timeout}s:\n"
                    f"{log_text}"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        """Terminate the process by PID (kill after 10 s) and remove the temp dir."""
        proc, self._proc = self._proc, None
        stop_process(proc)
        self._cleanup()

    def _cleanup(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> RealRegistry:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- HTTP

    def request(
        self,
        method: str,
        path_or_url: str,
        data: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 30.0,
    ) -> HTTPResponse:
        """One HTTP request; non-2xx answers are returned, not raised."""
        url = urllib.parse.urljoin(self.url + "/", path_or_url)
        req = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
        try:
            with self._opener.open(req, timeout=timeout) as resp:
                return HTTPResponse(resp.status, resp.headers, resp.read())
        except urllib.error.HTTPError as err:
            return HTTPResponse(err.code, err.headers, err.read())

    def _expect(self, resp: HTTPResponse, what: str, *ok: int) -> HTTPResponse:
        if resp.status not in ok:
            raise RealToolError(
                f"{what}: HTTP {resp.status}: {resp.body[:500].decode(errors='replace')}"
            )
        return resp

    def catalog(self, page_size: int = 100) -> list[str]:
        """All repository names, following ``Link: <...>; rel="next"`` pagination."""
        names: list[str] = []
        path: str | None = f"/v2/_catalog?n={page_size}"
        while path:
            resp = self._expect(self.request("GET", path), "catalog", 200)
            names.extend(json.loads(resp.body).get("repositories") or [])
            match = re.search(r"<([^>]+)>;\s*rel=\"?next\"?", resp.headers.get("Link", ""))
            path = match.group(1) if match else None
        return names

    def tags(self, repo: str) -> list[str]:
        """Sorted tags of ``repo``; ``[]`` if the registry reports NAME_UNKNOWN."""
        resp = self.request("GET", f"/v2/{repo}/tags/list")
        if resp.status == 404 and b"NAME_UNKNOWN" in resp.body:
            return []
        self._expect(resp, f"tags of {repo}", 200)
        return sorted(json.loads(resp.body).get("tags") or [])

    def manifest_digest(self, repo: str, ref: str) -> str:
        """Digest of ``repo:ref`` from the ``Docker-Content-Digest`` header of a HEAD."""
        resp = self._expect(
            self.request(
                "HEAD", f"/v2/{repo}/manifests/{ref}", headers={"Accept": ",".join(MANIFEST_ACCEPT)}
            ),
            f"HEAD manifest {repo}:{ref}",
            200,
        )
        return resp.headers["Docker-Content-Digest"]

    def get_manifest(self, repo: str, ref: str) -> tuple[bytes, str, str]:
        """``(body, media type, digest)`` of ``repo:ref`` (schema1 bodies are re-signed)."""
        resp = self._expect(
            self.request(
                "GET", f"/v2/{repo}/manifests/{ref}", headers={"Accept": ",".join(MANIFEST_ACCEPT)}
            ),
            f"GET manifest {repo}:{ref}",
            200,
        )
        return resp.body, resp.headers["Content-Type"], resp.headers["Docker-Content-Digest"]

    def manifest_exists(self, repo: str, ref: str) -> bool:
        """True if a HEAD of the manifest answers 200."""
        accept = {"Accept": ",".join(MANIFEST_ACCEPT)}
        return self.request("HEAD", f"/v2/{repo}/manifests/{ref}", headers=accept).status == 200

    def blob_exists(self, repo: str, digest: str) -> bool:
        """True if a HEAD of the blob in ``repo`` answers 200."""
        return self.request("HEAD", f"/v2/{repo}/blobs/{digest}").status == 200

    def get_blob(self, repo: str, digest: str) -> bytes:
        """Bytes of a blob."""
        return self._expect(
            self.request("GET", f"/v2/{repo}/blobs/{digest}"), f"GET blob {repo}@{digest}", 200
        ).body

    def delete_manifest(self, repo: str, digest: str) -> None:
        """DELETE a manifest by digest (needs ``storage.delete.enabled``)."""
        self._expect(
            self.request("DELETE", f"/v2/{repo}/manifests/{digest}"),
            f"DELETE manifest {repo}@{digest}",
            202,
        )

    def put_blob(self, repo: str, data: bytes, algorithm: str = "sha256") -> str:
        """Monolithic upload (POST + PUT ?digest=); returns the digest (``algorithm``:
        sha256, sha384 or sha512: the registry accepts all three)."""
        digest = f"{algorithm}:" + hashlib.new(algorithm, data).hexdigest()
        start = self._expect(
            self.request("POST", f"/v2/{repo}/blobs/uploads/", data=b""),
            f"start upload to {repo}",
            202,
        )
        location = start.headers["Location"]
        sep = "&" if "?" in location else "?"
        self._expect(
            self.request(
                "PUT",
                f"{location}{sep}digest={urllib.parse.quote(digest)}",
                data=data,
                headers={"Content-Type": "application/octet-stream"},
            ),
            f"finish upload of {digest} to {repo}",
            201,
        )
        return digest

    def put_manifest(self, repo: str, ref: str, data: bytes, media_type: str) -> str:
        """PUT a manifest by tag or digest; returns ``Docker-Content-Digest``."""
        resp = self._expect(
            self.request(
                "PUT",
                f"/v2/{repo}/manifests/{ref}",
                data=data,
                headers={"Content-Type": media_type},
            ),
            f"PUT manifest {repo}:{ref}",
            201,
        )
        return resp.headers["Docker-Content-Digest"]

    def start_abandoned_upload(self, repo: str, data: bytes) -> str:
        """POST an upload and PATCH ``data`` into it, never finishing it; returns its UUID."""
        start = self._expect(
            self.request("POST", f"/v2/{repo}/blobs/uploads/", data=b""),
            f"start upload to {repo}",
            202,
        )
        patch = self._expect(
            self.request(
                "PATCH",
                start.headers["Location"],
                data=data,
                headers={"Content-Type": "application/octet-stream"},
            ),
            f"PATCH upload in {repo}",
            202,
        )
        return patch.headers["Docker-Upload-UUID"]

    def push_from_layout(
        self, layout: OCILayoutWriter, repo: str, manifest: Descriptor, ref: str | None = None
    ) -> str:
        """Push a single (non-index) manifest of ``layout`` and its blobs through the API.

        ``ref`` defaults to the manifest digest (push by digest, untagged). Returns the digest.
        """
        body = layout.read_blob(manifest["digest"])
        doc = json.loads(body)
        for desc in [doc["config"], *doc.get("layers", [])]:
            if not self.blob_exists(repo, desc["digest"]):
                self.put_blob(repo, layout.read_blob(desc["digest"]))
        return self.put_manifest(repo, ref or manifest["digest"], body, manifest["mediaType"])


# --------------------------------------------------------------------------- garbage-collect


@dataclasses.dataclass
class GCPlan:
    """What ``docker-registry garbage-collect`` (2.8) printed it would delete / marked."""

    repos: list[str]  # repositories in walk order
    marked_manifests: set[tuple[str, str]]  # (repo, digest)
    marked_blobs: set[tuple[str, str]]  # (repo, digest) incl. children of lists/indexes
    manifests: set[tuple[str, str]]  # (repo, digest) eligible for deletion (only with -m)
    blobs: set[str]  # blob digests eligible for deletion
    summary: tuple[int, int, int] | None  # (blobs marked, blobs eligible, manifests eligible)
    layer_links: set[tuple[str, str]] = dataclasses.field(default_factory=set)  # v3 only


def garbage_collect(
    config_path: Path | str,
    dry_run: bool = True,
    delete_untagged: bool = False,
    timeout: float = 300.0,
    binary: str = REGISTRY_BIN,
) -> tuple[int, str]:
    """Run the official GC (2.8, or v3 with ``binary``); returns ``(returncode, output)``."""
    cmd = [binary, "garbage-collect"]
    if dry_run:
        cmd.append("--dry-run")
    if delete_untagged:
        cmd.append("--delete-untagged")
    cmd.append(str(config_path))
    proc = subprocess.run(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=clean_env(),
        timeout=timeout,
        check=False,
    )
    return proc.returncode, proc.stdout.decode(errors="replace")


_GC_MARK = re.compile(r"^(\S+): marking (manifest|blob) (\S+)$")
_GC_MANIFEST = re.compile(r"^manifest eligible for deletion: (\S+)$")
# v3: ``manifest eligible for deletion: {<repo> <digest> [<tags>]}``
_GC_MANIFEST_V3 = re.compile(r"^manifest eligible for deletion: \{(\S+) (\S+) \[[^\]]*\]\}$")
_GC_LAYER_LINK_V3 = re.compile(r"^(\S+): layer link eligible for deletion: (\S+)$")
_GC_BLOB = re.compile(r"^blob eligible for deletion: (\S+)$")
_GC_SUMMARY = re.compile(
    r"^(\d+) blobs marked, (\d+) blobs and (\d+) manifests eligible for deletion$"
)


def parse_gc_output(output: str) -> GCPlan:
    """Parse the (dry-run) stdout of the 2.8 GC.

    Lines, in order: a bare ``<repo>`` line starting each repository, then
    ``<repo>: marking manifest <digest> `` (trailing space), ``<repo>: marking blob <digest>``
    and, with ``-m``, ``manifest eligible for deletion: <digest>`` (no repo: it belongs to the
    last bare repo line); then an empty line,
    ``N blobs marked, N blobs and N manifests eligible for deletion`` and one
    ``blob eligible for deletion: <digest>`` per blob (random order). Log lines (``time=...``)
    are ignored. v3 prints ``manifest eligible for deletion: {<repo> <digest> [<tags>]}``
    and ``<repo>: layer link eligible for deletion: <digest>`` lines too.
    """
    plan = GCPlan([], set(), set(), set(), set(), None)
    repo = ""
    for raw in output.splitlines():
        line = raw.strip()
        if not line or line.startswith("time="):
            continue
        if m := _GC_MARK.match(line):
            target = plan.marked_manifests if m[2] == "manifest" else plan.marked_blobs
            target.add((m[1], m[3]))
        elif m := _GC_MANIFEST.match(line):
            plan.manifests.add((repo, m[1]))
        elif m := _GC_MANIFEST_V3.match(line):
            plan.manifests.add((m[1], m[2]))
        elif m := _GC_LAYER_LINK_V3.match(line):
            plan.layer_links.add((m[1], m[2]))
        elif m := _GC_BLOB.match(line):
            plan.blobs.add(m[1])
        elif m := _GC_SUMMARY.match(line):
            plan.summary = (int(m[1]), int(m[2]), int(m[3]))
        elif " " not in line:
            repo = line
            plan.repos.append(line)
    return plan


def gc_dry_run(config_path: Path | str, delete_untagged: bool = False,
               binary: str = REGISTRY_BIN) -> GCPlan:
    """Run a dry-run GC and parse it; raises RealToolError on a non-zero exit."""
    rc, out = garbage_collect(config_path, dry_run=True, delete_untagged=delete_untagged,
                              binary=binary)
    if rc != 0:
        raise RealToolError(f"garbage-collect --dry-run exited {rc}:\n{out}")
    return parse_gc_output(out)


# --------------------------------------------------------------------------- skopeo


def skopeo(*args: str, timeout: float = 300.0) -> str:
    """Run skopeo with a cleaned environment; returns stdout, raises RealToolError on failure."""
    cmd = [SKOPEO_BIN, *args]
    try:
        proc = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            env=clean_env(),
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as err:
        raise RealToolError(f"{SKOPEO_BIN} not found") from err
    if proc.returncode != 0:
        raise RealToolError(
            f"{' '.join(cmd)} exited {proc.returncode}:\n"
            f"{proc.stderr.decode(errors='replace').strip()}"
        )
    return proc.stdout.decode(errors="replace")


def skopeo_copy(src: str, dst: str, *extra: str) -> str:
    """``skopeo copy`` adding ``--src/--dest-tls-verify=false`` for ``docker://`` references."""
    flags = ["--quiet"]
    if src.startswith("docker://"):
        flags.append("--src-tls-verify=false")
    if dst.startswith("docker://"):
        flags.append("--dest-tls-verify=false")
    return skopeo("copy", *flags, *extra, src, dst)


# --------------------------------------------------------------------------- layer crafting


def make_tar(files: Mapping[str, bytes]) -> bytes:
    """Deterministic tar of ``files`` (sorted, parent dirs added, uid/gid 0, fixed mtime)."""
    dirs: set[str] = set()
    for name in files:
        parts = name.strip("/").split("/")[:-1]
        dirs.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    entries = sorted([(d, None) for d in dirs] + [(n.strip("/"), d) for n, d in files.items()])
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.mtime = FIXED_MTIME
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            if data is None:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(info)
            else:
                info.mode = 0o755 if "/bin/" in f"/{name}" else 0o644
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def compress(data: bytes, compression: Compression) -> bytes:
    """Compress deterministically: gzip (mtime 0, level 9), zstd (level 3) or none."""
    if compression == "gzip":
        return gzip.compress(data, compresslevel=9, mtime=0)
    if compression == "zstd":
        import zstandard

        return zstandard.ZstdCompressor(level=3).compress(data)
    if compression == "none":
        return data
    raise ValueError(f"unknown compression {compression!r}")


def make_layer(files: Mapping[str, bytes], compression: Compression = "gzip") -> tuple[bytes, str]:
    """Build a layer blob; returns ``(blob bytes, diff_id of the uncompressed tar)``."""
    tar = make_tar(files)
    return compress(tar, compression), sha256_digest(tar)


def pseudo_random_bytes(seed: str, size: int) -> bytes:
    """Deterministic incompressible bytes (SHA-256 counter stream)."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


LAYER_MEDIA_TYPES: dict[str, str] = {
    "gzip": MT_OCI_LAYER_GZIP,
    "zstd": MT_OCI_LAYER_ZSTD,
    "none": MT_OCI_LAYER,
}


@dataclasses.dataclass(frozen=True)
class Layer:
    """A layer written to an OCI layout: its descriptor and uncompressed diff_id."""

    descriptor: Descriptor
    diff_id: str

    @property
    def digest(self) -> str:
        """Digest of the (compressed) blob."""
        return str(self.descriptor["digest"])


def _json_bytes(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


class OCILayoutWriter:
    """Writes an OCI image layout (``oci-layout``, ``blobs/sha256``, ``index.json``).

    Every document is serialized compactly and deterministically; tags are ``index.json``
    entries carrying ``org.opencontainers.image.ref.name``.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        (self.path / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (self.path / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
        self._refs: dict[str, Descriptor] = {}
        self._write_index()

    def blob_path(self, digest: str) -> Path:
        """Path of a blob in the layout."""
        alg, hexpart = digest.split(":", 1)
        return self.path / "blobs" / alg / hexpart

    def read_blob(self, digest: str) -> bytes:
        """Bytes of a blob in the layout."""
        return self.blob_path(digest).read_bytes()

    def add_blob(self, data: bytes, media_type: str) -> Descriptor:
        """Store ``data``; returns its descriptor."""
        digest = sha256_digest(data)
        path = self.blob_path(digest)
        if not path.exists():
            path.write_bytes(data)
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    def add_layer(self, files: Mapping[str, bytes], compression: Compression = "gzip") -> Layer:
        """Craft a layer from ``files`` and store it."""
        blob, diff_id = make_layer(files, compression)
        return Layer(self.add_blob(blob, LAYER_MEDIA_TYPES[compression]), diff_id)

    def add_config(
        self,
        layers: Sequence[Layer],
        *,
        architecture: str = "amd64",
        os_name: str = "linux",
        variant: str | None = None,
        history: Sequence[str] | None = None,
        cmd: Sequence[str] = ("/bin/sh",),
        labels: Mapping[str, str] | None = None,
    ) -> Descriptor:
        """Store an OCI image config with matching ``rootfs.diff_ids`` and history.

        ``history`` gives one ``created_by`` per layer; a final empty-layer CMD entry is added.
        """
        created_by = list(history or [f"ADD layer {i}" for i in range(len(layers))])
        if len(created_by) != len(layers):
            raise ValueError("history needs one entry per layer")
        config: dict[str, Any] = {
            "created": FIXED_CREATED,
            "architecture": architecture,
            "os": os_name,
        }
        if variant:
            config["variant"] = variant
        config["config"] = {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": list(cmd),
            "Labels": dict(labels or {}),
        }
        config["rootfs"] = {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]}
        config["history"] = [{"created": FIXED_CREATED, "created_by": c} for c in created_by] + [
            {
                "created": FIXED_CREATED,
                "created_by": f"CMD {json.dumps(list(cmd))}",
                "empty_layer": True,
            }
        ]
        return self.add_blob(_json_bytes(config), MT_OCI_CONFIG)

    def add_manifest(self, doc: Mapping[str, Any], tag: str | None = None) -> Descriptor:
        """Store a manifest document (its ``mediaType`` is taken from it)."""
        desc = self.add_blob(_json_bytes(doc), str(doc["mediaType"]))
        if tag is not None:
            self.tag(tag, desc)
        return desc

    def add_image(
        self,
        layers: Sequence[Layer],
        *,
        tag: str | None = None,
        architecture: str = "amd64",
        os_name: str = "linux",
        variant: str | None = None,
        history: Sequence[str] | None = None,
        labels: Mapping[str, str] | None = None,
        annotations: Mapping[str, str] | None = None,
    ) -> Descriptor:
        """Store config + OCI image manifest; returns the manifest descriptor with platform."""
        config = self.add_config(
            layers,
            architecture=architecture,
            os_name=os_name,
            variant=variant,
            history=history,
            labels=labels,
        )
        doc: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": MT_OCI_MANIFEST,
            "config": config,
            "layers": [layer.descriptor for layer in layers],
        }
        if annotations:
            doc["annotations"] = dict(annotations)
        desc = self.add_manifest(doc, tag)
        platform: dict[str, str] = {"architecture": architecture, "os": os_name}
        if variant:
            platform["variant"] = variant
        return {**desc, "platform": platform}

    def add_index(
        self,
        manifests: Sequence[Descriptor],
        *,
        tag: str | None = None,
        annotations: Mapping[str, str] | None = None,
    ) -> Descriptor:
        """Store an OCI index over ``manifests`` (descriptors keep their ``platform``)."""
        doc: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": MT_OCI_INDEX,
            "manifests": [dict(m) for m in manifests],
        }
        if annotations:
            doc["annotations"] = dict(annotations)
        return self.add_manifest(doc, tag)

    def add_artifact(
        self,
        subject: Descriptor,
        artifact_type: str,
        blobs: Sequence[tuple[bytes, str]],
        *,
        tag: str | None = None,
        annotations: Mapping[str, str] | None = None,
    ) -> Descriptor:
        """Store an OCI 1.1 artifact: image manifest with ``artifactType``, empty config, subject.

        ``blobs`` are ``(bytes, media type)`` layers.
        """
        config = self.add_blob(EMPTY_JSON, MT_OCI_EMPTY)
        doc: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": MT_OCI_MANIFEST,
            "artifactType": artifact_type,
            "config": config,
            "layers": [self.add_blob(data, mt) for data, mt in blobs],
            "subject": {k: subject[k] for k in ("mediaType", "digest", "size")},
        }
        if annotations:
            doc["annotations"] = dict(annotations)
        return self.add_manifest(doc, tag)

    def tag(self, name: str, desc: Descriptor) -> None:
        """Point ref name ``name`` at ``desc`` in ``index.json``."""
        entry = {k: desc[k] for k in ("mediaType", "digest", "size")}
        if "platform" in desc and desc["mediaType"] == MT_OCI_MANIFEST:
            entry["platform"] = desc["platform"]
        entry["annotations"] = {"org.opencontainers.image.ref.name": name}
        self._refs[name] = entry
        self._write_index()

    def ref(self, name: str) -> str:
        """``oci:DIR:NAME`` transport reference for skopeo."""
        return f"oci:{self.path}:{name}"

    def _write_index(self) -> None:
        doc = {
            "schemaVersion": 2,
            "mediaType": MT_OCI_INDEX,
            "manifests": [self._refs[k] for k in sorted(self._refs)],
        }
        (self.path / "index.json").write_bytes(_json_bytes(doc))


# --------------------------------------------------------------------------- sample registry

FIXED_UPLOAD_UUID = "0f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f0"


@dataclasses.dataclass
class SampleInfo:
    """What ``build_sample_registry`` built; digests are as the registry API reports them.

    Tuples are used for small records; ``to_json``/``from_json`` round-trip through lists.
    """

    catalog: list[str]  # /v2/_catalog after building (sorted, as the registry walks)
    tags: dict[str, dict[str, str]]  # repo -> tag -> manifest digest, for every catalog repo
    revisions: dict[str, list[str]]  # repo -> sorted manifest digests with a revision link
    media_types: dict[str, str]  # manifest digest -> media type (also the deleted manifest)
    references: dict[str, list[str]]  # manifest digest -> referenced digests (GC mark order)
    index_children: dict[str, list[str]]  # OCI index / docker list digest -> child digests
    layer_links: dict[str, list[str]]  # repo -> sorted digests of its _layers links
    all_blobs: list[str]  # every blobs/**/data digest on disk, sorted
    blobs: dict[str, str]  # label -> digest of notable layers/configs
    shared_layers: list[str]  # layer digests linked in more than one repository
    oci_index: tuple[str, str, str]  # (repo, tag, digest)
    docker_list: tuple[str, str, str]  # (repo, tag, digest)
    zstd: tuple[str, str, str]  # (repo, manifest digest, zstd layer digest)
    schema1: tuple[str, str, str]  # (repo, tag, digest)
    deleted: tuple[str, str, str]  # (repo, former tag, digest) DELETEd through the API
    unreferenced_blobs: list[str]  # blobs no remaining revision references (= 2.8 GC plan)
    untagged: tuple[str, str, str]  # (repo, tag that moved away, digest of the old revision)
    artifact: tuple[str, str, str, str]  # (repo, digest, subject, artifactType); untagged
    referrer: tuple[str, str, str, str]  # (repo, tag, digest, subject); tagged artifact
    upload: tuple[str, str, int]  # (repo, uuid, bytes) of the abandoned upload

    def to_json(self) -> dict[str, Any]:
        """A JSON-serializable dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> SampleInfo:
        """Inverse of ``to_json`` (extra keys are ignored)."""
        kwargs: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            value = doc[field.name]
            kwargs[field.name] = tuple(value) if str(field.type).startswith("tuple") else value
        return cls(**kwargs)


def manifest_references(body: bytes) -> list[str]:
    """Digests a stored manifest references, as the 2.8 GC marks them (deduplicated)."""
    doc = json.loads(body)
    if doc.get("schemaVersion") == 1:
        refs = [layer["blobSum"] for layer in doc.get("fsLayers", [])]
    elif "manifests" in doc:
        refs = [m["digest"] for m in doc["manifests"]]
    else:
        refs = [doc["config"]["digest"], *(layer["digest"] for layer in doc.get("layers", []))]
    return list(dict.fromkeys(refs))


def data_dir(root: Path | str) -> Path:
    """``root/docker/registry/v2``."""
    return Path(root) / "docker" / "registry" / "v2"


def read_stored_blob(root: Path | str, digest: str) -> bytes:
    """Bytes of ``blobs/<alg>/<xx>/<hex>/data`` in the tree at ``root``."""
    alg, hexpart = digest.split(":", 1)
    return (data_dir(root) / "blobs" / alg / hexpart[:2] / hexpart / "data").read_bytes()


def _scan_links(root: Path, kind: str) -> dict[str, list[str]]:
    """repo -> sorted link contents of ``_layers`` or ``_manifests/revisions`` links."""
    repos = data_dir(root) / "repositories"
    result: dict[str, set[str]] = {}
    for link in repos.glob(f"**/{kind}/sha256/*/link"):
        repo = link.relative_to(repos).as_posix().split(f"/{kind}/")[0]
        result.setdefault(repo, set()).add(link.read_text())
    return {repo: sorted(ds) for repo, ds in sorted(result.items())}


def empty_dirs(root: Path | str) -> list[str]:
    """Sorted POSIX paths (relative to ``root``) of empty directories, which git cannot store."""
    root = Path(root)
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_dir() and not any(p.iterdir())
    )


def materialize_fixture(src: Path | str, dest: Path | str, empty: Sequence[str] = ()) -> Path:
    """Copy a fixture tree to ``dest`` and recreate its ``empty`` directories; returns ``dest``."""
    dest = Path(dest)
    shutil.copytree(src, dest, symlinks=True)
    for rel in empty:
        (dest / rel).mkdir(parents=True, exist_ok=True)
    return dest


def pull_every_tag(reg: RealRegistry, dest: Path | str) -> list[str]:
    """``skopeo copy --all`` every tag of every repository into ``dir:`` copies under ``dest``.

    Returns the references pulled; raises RealToolError on the first failure.
    """
    pulled = []
    Path(dest).mkdir(parents=True, exist_ok=True)
    for n, repo in enumerate(reg.catalog()):
        for m, tag in enumerate(reg.tags(repo)):
            ref = f"docker://{reg.host}/{repo}:{tag}"
            skopeo_copy(ref, f"dir:{Path(dest) / f'{n}-{m}'}", "--all")
            pulled.append(f"{repo}:{tag}")
    return pulled


def _sample_files(name: str, random_size: int, **extra: bytes) -> dict[str, bytes]:
    files = {
        f"usr/share/regfsck/{name}.txt": f"regfsck sample layer {name}\n".encode(),
        f"usr/lib/regfsck/{name}.bin": pseudo_random_bytes(name, random_size),
    }
    files.update(extra)
    return files


def build_sample_registry(root: Path | str, *, fixed_upload: bool = False) -> SampleInfo:
    """Build the sample data directory ``root/docker/registry/v2`` with the real tools.

    All content is deterministic (same digests every run) except the abandoned upload's UUID
    and ``startedat``; with ``fixed_upload`` they are rewritten afterwards to
    ``FIXED_UPLOAD_UUID`` and ``FIXED_CREATED`` (so the upload is always stale). Repositories:

    * ``library/base``: OCI image tagged ``latest``, ``1.0``, ``1``; an SBOM artifact
      (``subject`` = latest, empty-JSON config) pushed by digest only; a cosign signature
      written by skopeo as the ``sha256-<subject hex>.sig`` tag.
    * ``charts/demo``: a Helm chart pushed with oras-py (tag ``0.1.0``) and its cosign
      signature.
    * ``a/b``: OCI image on the shared base layer (``a/b`` is also the parent of ``a/b/c``).
    * ``a/b/c``: docker schema2: ``latest`` re-pushed (old revision left untagged), ``v2`` =
      new ``latest``, ``doomed`` pushed then DELETEd by digest; an abandoned upload.
    * ``multi/oci``: OCI index ``latest`` (linux/amd64 + linux/arm64/v8), children untagged.
    * ``multi/docker``: the same index pushed as a docker manifest list ``latest``.
    * ``compress/zstd``: OCI image ``latest`` with the gzip base layer and a zstd layer.
    * ``legacy/schema1``: docker schema1 manifest ``latest`` (skopeo ``--format v2s1``).
    """
    root = Path(root)
    if data_dir(root).exists():
        raise RealToolError(f"{data_dir(root)} already exists; build into an empty root")
    with tempfile.TemporaryDirectory(prefix="regfsck-layout-") as tmp, RealRegistry(root) as reg:
        lay = OCILayoutWriter(Path(tmp) / "layout")
        media_types: dict[str, str] = {}
        revisions: dict[str, set[str]] = {}

        def push(ref: str, repo: str, tag: str, *extra: str) -> str:
            skopeo_copy(lay.ref(ref), f"docker://{reg.host}/{repo}:{tag}", *extra)
            return reg.manifest_digest(repo, tag)

        def record(repo: str, digest: str) -> str:
            media_types[digest] = reg.get_manifest(repo, digest)[1]
            revisions.setdefault(repo, set()).add(digest)
            return digest

        base = lay.add_layer(
            _sample_files(
                "base",
                48 * 1024,
                **{"etc/os-release": b'NAME="regfsck-base"\nID=regfsck\n', "bin/sh": b"#!fake\n"},
            )
        )
        layers = {
            name: lay.add_layer(_sample_files(name, size))
            for name, size in [
                ("app-v1", 8192),
                ("app-v2", 8192),
                ("a-b", 4096),
                ("doomed", 16384),
                ("amd64", 4096),
                ("arm64", 4096),
                ("schema1", 4096),
            ]
        }
        layers["zstd"] = lay.add_layer(_sample_files("zstd", 8192), "zstd")
        layers["base"] = base

        def image(name: str, tag: str | None = None, **kw: Any) -> Descriptor:
            return lay.add_image(
                [base, layers[name]], tag=tag, history=["ADD base", f"ADD {name}"], **kw
            )

        # library/base: one OCI image, three tags.
        base_img = lay.add_image([base], tag="base", history=["ADD base"])
        for tag in ("latest", "1.0", "1"):
            push("base", "library/base", tag, "--preserve-digests")
        base_digest = record("library/base", base_img["digest"])

        # a/b: OCI image sharing the base layer.
        image("a-b", "a-b")
        ab_digest = record("a/b", push("a-b", "a/b", "latest", "--preserve-digests"))

        # a/b/c: docker schema2; re-pushed tag; manifest deleted by digest.
        image("app-v1", "app-v1")
        image("app-v2", "app-v2")
        image("doomed", "doomed")
        v1_digest = record("a/b/c", push("app-v1", "a/b/c", "latest", "--format", "v2s2"))
        v2_digest = record("a/b/c", push("app-v2", "a/b/c", "latest", "--format", "v2s2"))
        push("app-v2", "a/b/c", "v2", "--format", "v2s2")
        doomed_digest = push("doomed", "a/b/c", "doomed", "--format", "v2s2")
        doomed_body, media_types[doomed_digest], _ = reg.get_manifest("a/b/c", doomed_digest)
        reg.delete_manifest("a/b/c", doomed_digest)

        # multi/oci (OCI index) and multi/docker (docker manifest list), two platforms each.
        amd64 = image("amd64", architecture="amd64")
        arm64 = image("arm64", architecture="arm64", variant="v8")
        index = lay.add_index([amd64, arm64], tag="multi")
        index_digest = record(
            "multi/oci", push("multi", "multi/oci", "latest", "--all", "--preserve-digests")
        )
        list_digest = record(
            "multi/docker", push("multi", "multi/docker", "latest", "--all", "--format", "v2s2")
        )
        index_children: dict[str, list[str]] = {}
        for repo, digest in [("multi/oci", index_digest), ("multi/docker", list_digest)]:
            children = manifest_references(reg.get_manifest(repo, digest)[0])
            index_children[digest] = [record(repo, child) for child in children]

        # compress/zstd: mixed gzip + zstd layers (written as zstd in the layout, kept as is).
        zstd_img = image("zstd", "zstd")
        zstd_digest = record(
            "compress/zstd", push("zstd", "compress/zstd", "latest", "--preserve-digests")
        )

        # legacy/schema1: converted by skopeo, stored as the unsigned canonical payload.
        image("schema1", "schema1")
        s1_digest = record(
            "legacy/schema1", push("schema1", "legacy/schema1", "latest", "--format", "v2s1")
        )

        # Artifacts about library/base:latest, pushed through the API.
        sbom_type = "application/spdx+json"
        sbom = lay.add_artifact(
            base_img,
            sbom_type,
            [(b'{"spdxVersion":"SPDX-2.3","name":"regfsck-base"}', sbom_type)],
            annotations={"org.opencontainers.image.created": FIXED_CREATED},
        )
        sbom_digest = record("library/base", reg.push_from_layout(lay, "library/base", sbom))
        # A cosign signature, written by skopeo from a sigstore signature file (deterministic
        # ECDSA, fixed identity: same digest every run); a Helm chart (oras-py) signed too.
        from tests import realtools_artifacts as ra

        signer = ra.Signer()
        sig_tag, sig_digest = ra.cosign_sign(reg, "library/base", "latest", Path(tmp), signer,
                                             identity="registry.example/library/base")
        record("library/base", sig_digest)
        chart_digest = record("charts/demo", ra.push_artifact(
            reg, "charts/demo", "0.1.0", None, [(ra.helm_chart_tgz(), ra.MT_HELM_CHART)],
            config=(ra.helm_chart_config(), ra.MT_HELM_CONFIG)))
        chart_sig_tag, chart_sig = ra.cosign_sign(reg, "charts/demo", "0.1.0", Path(tmp), signer,
                                                  identity="registry.example/charts/demo")
        record("charts/demo", chart_sig)

        # Abandoned upload in a/b/c.
        upload_data = pseudo_random_bytes("abandoned-upload", 3000)
        upload_uuid = reg.start_abandoned_upload("a/b/c", upload_data)

        catalog = reg.catalog()
        tags = {repo: {t: reg.manifest_digest(repo, t) for t in reg.tags(repo)} for repo in catalog}
        expected_tags = {
            "library/base": {
                "latest": base_digest,
                "1.0": base_digest,
                "1": base_digest,
                sig_tag: sig_digest,
            },
            "a/b": {"latest": ab_digest},
            "charts/demo": {"0.1.0": chart_digest, chart_sig_tag: chart_sig},
            "a/b/c": {"latest": v2_digest, "v2": v2_digest},
            "multi/oci": {"latest": index_digest},
            "multi/docker": {"latest": list_digest},
            "compress/zstd": {"latest": zstd_digest},
            "legacy/schema1": {"latest": s1_digest},
        }
        if tags != expected_tags:
            raise RealToolError(f"registry reports tags {tags}, expected {expected_tags}")
        for got, want in [
            (index_digest, index["digest"]),
            (zstd_digest, zstd_img["digest"]),
            (sbom_digest, sbom["digest"]),
        ]:
            if got != want:
                raise RealToolError(f"digest changed on push: {want} -> {got}")
        if reg.manifest_exists("a/b/c", doomed_digest):
            raise RealToolError("deleted manifest is still served")

    if fixed_upload:
        uploads = data_dir(root) / "repositories" / "a/b/c" / "_uploads"
        (uploads / upload_uuid / "startedat").write_text(FIXED_CREATED)
        (uploads / upload_uuid).rename(uploads / FIXED_UPLOAD_UUID)
        upload_uuid = FIXED_UPLOAD_UUID

    revision_lists = {repo: sorted(ds) for repo, ds in sorted(revisions.items())}
    if _scan_links(root, "_manifests/revisions") != revision_lists:
        raise RealToolError("revision links on disk differ from what was pushed")
    references = {d: manifest_references(read_stored_blob(root, d)) for d in sorted(media_types)}
    layer_links = _scan_links(root, "_layers")
    all_blobs = sorted(
        f"{p.parent.parent.parent.name}:{p.parent.name}"
        for p in (data_dir(root) / "blobs").glob("*/*/*/data")
    )
    live = {d for ds in revision_lists.values() for d in ds}
    marked = live | {r for d in live for r in references[d]}
    layer_repos: dict[str, int] = {}
    for digests in layer_links.values():
        for d in digests:
            layer_repos[d] = layer_repos.get(d, 0) + 1
    layer_digests = {layer.digest for layer in layers.values()}
    doomed_config = json.loads(doomed_body)["config"]["digest"]
    return SampleInfo(
        catalog=catalog,
        tags=tags,
        revisions=revision_lists,
        media_types=dict(sorted(media_types.items())),
        references=references,
        index_children=index_children,
        layer_links=layer_links,
        all_blobs=all_blobs,
        blobs={
            **{f"layer/{name}": layer.digest for name, layer in sorted(layers.items())},
            "config/doomed": doomed_config,
            "empty-json": EMPTY_JSON_DIGEST,
        },
        shared_layers=sorted(d for d, n in layer_repos.items() if n > 1 and d in layer_digests),
        oci_index=("multi/oci", "latest", index_digest),
        docker_list=("multi/docker", "latest", list_digest),
        zstd=("compress/zstd", zstd_digest, layers["zstd"].digest),
        schema1=("legacy/schema1", "latest", s1_digest),
        deleted=("a/b/c", "doomed", doomed_digest),
        unreferenced_blobs=sorted(set(all_blobs) - marked),
        untagged=("a/b/c", "latest", v1_digest),
        artifact=("library/base", sbom_digest, base_digest, sbom_type),
        referrer=("library/base", sig_tag, sig_digest, base_digest),
        upload=("a/b/c", upload_uuid, len(upload_data)),
    )
