"""Write a layout-faithful synthetic registry tree directly (no server), fast enough for 1M files.

What it writes, per repository, exactly as `docker-registry` 2.8 lays it out (link files are the
bare digest, no newline; blobs under `blobs/sha256/<xx>/<hex>/data`; an empty `_uploads/`):

* tagged single-platform images, alternating docker schema2 and OCI, each on one of a few
  shared base-layer chains plus its own layers (real gzip'd tars, configs with true diff_ids);
* every `index_every`-th repository: a multi-arch OCI index or docker manifest list whose two
  platform children are pushed by digest (untagged);
* every `history_every`-th tag was re-pushed: the old revision stays, untagged, in the tag's
  `index/` (kept by a plain gc, swept by `--delete-untagged`);
* every `referrer_every`-th repository: an SBOM artifact (OCI `subject`, empty-JSON config)
  pushed by digest;
* every `deleted_every`-th repository: a manifest DELETEd through the API (its revision
  directory left empty, its tag gone, its blobs and `_layers` links left behind = orphans);
* every `orphan_every`-th repository: a layer uploaded whose manifest never came;
* every `upload_every`-th repository: an abandoned upload (`startedat`, `data`, and real Go
  sha256 `hashstates`), stale or fresh.

`generate()` returns a `SynthResult` with what a correct collector must find (the blobs no
revision reaches, the blobs no tag reaches). Content is a pure function of the config.

Command line: `python benchmarks/synth.py ROOT --files 100000` (see --help).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import multiprocessing
import os
import random
import shutil
import struct
import sys
import tarfile
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

V2 = "docker/registry/v2"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
EMPTY_JSON = b"{}"
SBOM_TYPE = "application/spdx+json"
CREATED = "2024-01-01T00:00:00Z"
STALE_STARTEDAT = "2024-01-01T00:00:00Z"
GZIP_LIMIT = 256 * 1024
PROBE_REPOS = 120  # larger layers are stored as plain tar (gzip of random data is slow)


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- Go hash states

def _icbrt(n: int) -> int:
    """Integer cube root (floor)."""
    x = 1 << ((n.bit_length() + 2) // 3)
    while True:
        y = (2 * x + n // (x * x)) // 3
        if y >= x:
            break
        x = y
    while x * x * x > n:
        x -= 1
    while (x + 1) ** 3 <= n:
        x += 1
    return x


def _primes(count: int) -> list[int]:
    found: list[int] = []
    n = 2
    while len(found) < count:
        if all(n % p for p in found if p * p <= n):
            found.append(n)
        n += 1
    return found


_P = _primes(64)
_K = [_icbrt(p << 96) & 0xFFFFFFFF for p in _P]
_H0 = [math.isqrt(p << 64) & 0xFFFFFFFF for p in _P[:8]]
_M = 0xFFFFFFFF


def _rotr(x: int, n: int) -> int:
    return ((x >> n) | (x << (32 - n))) & _M


def _compress(h: list[int], block: bytes) -> list[int]:
    """The SHA-256 compression function (pure Python; only for small upload hash states)."""
    w = list(struct.unpack(">16I", block))
    for i in range(16, 64):
        s0 = _rotr(w[i - 15], 7) ^ _rotr(w[i - 15], 18) ^ (w[i - 15] >> 3)
        s1 = _rotr(w[i - 2], 17) ^ _rotr(w[i - 2], 19) ^ (w[i - 2] >> 10)
        w.append((w[i - 16] + s0 + w[i - 7] + s1) & _M)
    a, b, c, d, e, f, g, hh = h
    for i in range(64):
        t1 = (hh + (_rotr(e, 6) ^ _rotr(e, 11) ^ _rotr(e, 25)) + ((e & f) ^ (~e & g)) + _K[i] + w[i]) & _M
        t2 = ((_rotr(a, 2) ^ _rotr(a, 13) ^ _rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c))) & _M
        a, b, c, d, e, f, g, hh = (t1 + t2) & _M, a, b, c, (d + t1) & _M, e, f, g
    return [(x + y) & _M for x, y in zip(h, (a, b, c, d, e, f, g, hh), strict=True)]


def go_sha256_state(data: bytes) -> bytes:
    """The 108-byte state Go's sha256 `MarshalBinary` writes after hashing `data`.

    This is what the registry stores in `_uploads/<id>/hashstates/sha256/<offset>`."""
    h = list(_H0)
    full = len(data) - len(data) % 64
    for start in range(0, full, 64):
        h = _compress(h, data[start:start + 64])
    return b"sha\x03" + struct.pack(">8I", *h) + data[full:].ljust(64, b"\0") + struct.pack(">Q", len(data))


def sha256_from_state(state: bytes, rest: bytes = b"") -> str:
    """Finish a Go sha256 state (for tests: proves the state is the real one)."""
    h = list(struct.unpack(">8I", state[4:36]))
    length = struct.unpack(">Q", state[100:108])[0]
    pending = state[36:36 + length % 64] + rest
    length += len(rest)
    pending += b"\x80" + b"\0" * ((55 - length) % 64) + struct.pack(">Q", length * 8)
    for start in range(0, len(pending), 64):
        h = _compress(h, pending[start:start + 64])
    return "sha256:" + struct.pack(">8I", *h).hex()


# --------------------------------------------------------------------------- configuration

@dataclass(frozen=True)
class SynthConfig:
    """Shape of the tree; every `*_every` is "one repository (or tag) in N", 0 = never."""

    repositories: int = 50
    tags_per_repo: int = 3
    unique_layers: int = 2
    base_chains: int = 8
    base_depth: int = 2
    layer_sizes: tuple[int, ...] = (512, 1024, 2048)  # random payload per layer, cycled
    index_every: int = 4
    history_every: int = 3
    referrer_every: int = 5
    deleted_every: int = 6
    orphan_every: int = 4
    upload_every: int = 8
    nested_every: int = 7
    seed: int = 0

    @classmethod
    def for_files(cls, files: int, **overrides: Any) -> SynthConfig:
        """A config whose tree holds about `files` regular files (measured on a probe tree)."""
        probe = cls(**{**overrides, "repositories": PROBE_REPOS})
        writer = CountingWriter("")
        chains = [[blob for _, blob in chain] for chain in base_chains(probe)]
        for i in range(PROBE_REPOS):
            RepoBuilder(writer, probe, i, chains, set()).build()
        per_repo = writer.files / PROBE_REPOS
        fixed = probe.base_chains * probe.base_depth + 1
        return cls(**{**overrides, "repositories": max(1, round((files - fixed) / per_repo))})


def config_for_bytes(total: int, **overrides: Any) -> SynthConfig:
    """A config whose layers hold about `total` bytes (sizes cycle through `layer_sizes`)."""
    sizes = overrides.get("layer_sizes", SynthConfig.layer_sizes)
    probe = SynthConfig(**{**overrides, "repositories": PROBE_REPOS, "layer_sizes": (1,)})
    writer = CountingWriter("")
    chains = [[blob for _, blob in chain] for chain in base_chains(probe)]
    layers = 0
    for i in range(PROBE_REPOS):
        builder = RepoBuilder(writer, probe, i, chains, set())
        builder.build()
        layers += builder.layer_counter
    per_repo = layers / PROBE_REPOS * sum(sizes) / len(sizes)
    return SynthConfig(**{**overrides, "repositories": max(1, round(total / per_repo))})


@dataclass
class SynthResult:
    """What was written and what a correct collector must conclude about it."""

    root: str
    config: dict[str, Any]
    files: int = 0
    dirs: int = 0
    blob_files: int = 0
    link_files: int = 0
    bytes: int = 0
    repositories: list[str] = field(default_factory=list)
    tags: dict[str, dict[str, str]] = field(default_factory=dict)  # repo -> tag -> digest
    manifests: int = 0
    untagged_revisions: list[tuple[str, str]] = field(default_factory=list)  # (repo, digest)
    unreferenced: set[str] = field(default_factory=set)  # no revision link reaches them
    untagged_unreachable: set[str] = field(default_factory=set)  # no tag (or kept referrer) does
    unreferenced_bytes: int = 0
    uploads: list[tuple[str, str, int, bool]] = field(default_factory=list)  # repo, id, size, stale
    deleted_revision_dirs: int = 0
    seconds: float = 0.0

    @property
    def v2(self) -> str:
        return os.path.join(self.root, V2)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["unreferenced"] = sorted(self.unreferenced)
        data["untagged_unreachable"] = sorted(self.untagged_unreachable)
        return data

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> SynthResult:
        result = cls(**{k: v for k, v in doc.items() if k in cls.__dataclass_fields__})
        result.unreferenced = set(doc["unreferenced"])
        result.untagged_unreachable = set(doc["untagged_unreachable"])
        result.untagged_revisions = [tuple(x) for x in doc["untagged_revisions"]]  # type: ignore[misc]
        result.uploads = [tuple(x) for x in doc["uploads"]]  # type: ignore[misc]
        return result


# --------------------------------------------------------------------------- writing

class TreeWriter:
    """Creates files under `v2`, remembering directories it made (one mkdir per new dir)."""

    def __init__(self, v2: str) -> None:
        self.v2 = v2
        self.made: set[str] = set()
        self.files = 0
        self.dirs = 0
        self.bytes = 0
        self.blob_files = 0
        self.link_files = 0

    def mkdirs(self, rel: str) -> None:
        if rel in self.made or not rel:
            return
        parent = rel.rpartition("/")[0]
        self.mkdirs(parent)
        try:
            os.mkdir(os.path.join(self.v2, rel))
            self.dirs += 1
        except FileExistsError:
            pass
        self.made.add(rel)

    def write(self, rel: str, data: bytes) -> None:
        self.mkdirs(rel.rpartition("/")[0])
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        fd = os.open(os.path.join(self.v2, rel), flags, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        self.files += 1
        self.bytes += len(data)

    def remove(self, rel: str) -> None:
        os.unlink(os.path.join(self.v2, rel))
        self.files -= 1

    def blob(self, data: bytes) -> str:
        digest = sha256_digest(data)
        hex_part = digest[7:]
        self.write(f"blobs/sha256/{hex_part[:2]}/{hex_part}/data", data)
        self.blob_files += 1
        return digest

    def link(self, rel_dir: str, digest: str) -> None:
        self.write(f"{rel_dir}/link", digest.encode("ascii"))
        self.link_files += 1


class CountingWriter(TreeWriter):
    """Counts what a TreeWriter would write, touching nothing (sizing a tree cheaply)."""

    def mkdirs(self, rel: str) -> None:
        if rel and rel not in self.made:
            self.made.add(rel)
            self.dirs += 1

    def write(self, rel: str, data: bytes) -> None:
        self.files += 1
        self.bytes += len(data)

    def remove(self, rel: str) -> None:
        self.files -= 1


@dataclass(frozen=True)
class Blob:
    digest: str
    size: int
    media_type: str
    diff_id: str = ""
    platform: dict[str, str] | None = None

    def descriptor(self, **extra: Any) -> dict[str, Any]:
        return {"mediaType": self.media_type, "size": self.size, "digest": self.digest, **extra}


def _tar(name: str, payload: bytes) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 1704067200
    info.mode = 0o644
    pad = (-len(payload)) % 512
    return info.tobuf(format=tarfile.USTAR_FORMAT) + payload + b"\0" * pad + b"\0" * 1024


def random_bytes(rng: random.Random, size: int) -> bytes:
    """`size` pseudo-random bytes (in 16 MiB pieces: randbytes cannot do 256 MiB at once)."""
    piece = 1 << 24
    return b"".join(rng.randbytes(min(piece, size - start)) for start in range(0, size, piece))


def make_layer_bytes(rng: random.Random, name: str, size: int, docker: bool) -> tuple[bytes, str, str]:
    """(blob bytes, media type, diff_id): a real tar, gzip'd when small."""
    tar = _tar(name, random_bytes(rng, size))
    diff_id = sha256_digest(tar)
    if len(tar) <= GZIP_LIMIT:
        return gzip.compress(tar, compresslevel=1, mtime=0), DOCKER_LAYER if docker else OCI_LAYER, diff_id
    return tar, DOCKER_LAYER_TAR if docker else OCI_LAYER_TAR, diff_id


def _json(doc: Any) -> bytes:
    return json.dumps(doc, indent=3).encode()


def repo_name(index: int, config: SynthConfig) -> str:
    name = f"team{index % 61:02d}/app{index:06d}"
    if config.nested_every and index % config.nested_every == config.nested_every - 1:
        return f"team{(index - 1) % 61:02d}/app{index - 1:06d}/sub"  # a repository inside one
    return name


def _every(n: int, i: int) -> bool:
    return n > 0 and i % n == n - 1


def base_chains(config: SynthConfig) -> list[list[tuple[bytes, Blob]]]:
    """The shared base layers (same bytes for a given seed), as (bytes, blob) chains."""
    rng = random.Random(f"{config.seed}/base")
    chains = []
    for c in range(config.base_chains):
        chain = []
        for d in range(config.base_depth):
            docker = False  # base layers are stored once; their media type is per manifest
            data, _, diff_id = make_layer_bytes(rng, f"base/{c}/{d}.bin", 4096, docker)
            chain.append((data, Blob(sha256_digest(data), len(data), "", diff_id)))
        chains.append(chain)
    return chains


@dataclass
class RepoResult:
    name: str
    tags: dict[str, str] = field(default_factory=dict)
    untagged: list[str] = field(default_factory=list)
    unreferenced: set[str] = field(default_factory=set)
    untagged_unreachable: set[str] = field(default_factory=set)
    unreferenced_bytes: int = 0
    shared_rev: set[str] = field(default_factory=set)  # shared blobs reached from revisions
    shared_tag: set[str] = field(default_factory=set)  # shared blobs reached from tags
    uploads: list[tuple[str, str, int, bool]] = field(default_factory=list)
    manifests: int = 0
    deleted: int = 0


class RepoBuilder:
    """Writes one repository as a sequence of pushes, tracking what each revision reaches."""

    def __init__(self, w: TreeWriter, config: SynthConfig, index: int,
                 chains: list[list[Blob]], shared: set[str]) -> None:
        self.w = w
        self.config = config
        self.index = index
        self.rng = random.Random(f"{config.seed}/repo/{index}")
        self.name = repo_name(index, config)
        self.base = f"repositories/{self.name}"
        self.chains = chains
        self.shared = shared
        self.linked: set[str] = set()
        self.local: dict[str, int] = {}  # blobs written for this repo -> size
        self.refs: dict[str, list[str]] = {}  # manifest -> referenced digests
        self.subjects: dict[str, str] = {}  # referrer -> subject
        self.revisions: set[str] = set()
        self.result = RepoResult(self.name)
        self.layer_counter = 0

    # -- primitive pushes -------------------------------------------------------
    def _blob(self, data: bytes) -> str:
        digest = self.w.blob(data)
        self.local[digest] = len(data)
        return digest

    def _layer_link(self, digest: str) -> None:
        if digest not in self.linked:
            self.linked.add(digest)
            self.w.link(f"{self.base}/_layers/sha256/{digest[7:]}", digest)

    def _upload_layer(self, docker: bool) -> Blob:
        sizes = self.config.layer_sizes
        size = sizes[self.layer_counter % len(sizes)]
        data, media_type, diff_id = make_layer_bytes(
            self.rng, f"app/{self.index}/{self.layer_counter}.bin", size, docker)
        self.layer_counter += 1
        digest = self._blob(data)
        self._layer_link(digest)
        return Blob(digest, len(data), media_type, diff_id)

    def _revision(self, digest: str) -> None:
        self.w.link(f"{self.base}/_manifests/revisions/sha256/{digest[7:]}", digest)
        self.revisions.add(digest)
        self.result.manifests += 1

    def _tag(self, tag: str, digest: str) -> None:
        self.w.link(f"{self.base}/_manifests/tags/{tag}/index/sha256/{digest[7:]}", digest)
        self.w.link(f"{self.base}/_manifests/tags/{tag}/current", digest)
        self.result.tags[tag] = digest

    # -- images ------------------------------------------------------------------
    def image(self, docker: bool, arch: str = "amd64", variant: str | None = None) -> Blob:
        """Push config + layers + manifest (by digest); returns the manifest."""
        chain = self.chains[self.rng.randrange(len(self.chains))]
        layer_type = DOCKER_LAYER if docker else OCI_LAYER
        layers = [Blob(b.digest, b.size, layer_type, b.diff_id) for b in chain]
        for blob in layers:
            self._layer_link(blob.digest)
        layers += [self._upload_layer(docker) for _ in range(self.config.unique_layers)]
        platform: dict[str, str] = {"architecture": arch, "os": "linux"}
        if variant:
            platform["variant"] = variant
        config_doc = {
            **platform, "created": CREATED,
            "config": {"Env": ["PATH=/usr/bin:/bin"], "Cmd": ["/bin/sh"],
                       "Labels": {"synth.repo": self.name}},
            "rootfs": {"type": "layers", "diff_ids": [b.diff_id for b in layers]},
            "history": [{"created": CREATED, "created_by": f"ADD layer {i}"}
                        for i in range(len(layers))],
        }
        config_bytes = _json(config_doc)
        config = Blob(self._blob(config_bytes), len(config_bytes), DOCKER_CONFIG if docker else OCI_CONFIG)
        self._layer_link(config.digest)
        doc = {"schemaVersion": 2, "mediaType": DOCKER_MANIFEST if docker else OCI_MANIFEST,
               "config": config.descriptor(), "layers": [b.descriptor() for b in layers]}
        manifest = self._manifest(doc, [config.digest, *(b.digest for b in layers)])
        return Blob(manifest.digest, manifest.size, manifest.media_type, platform=platform)

    def _manifest(self, doc: dict[str, Any], refs: list[str]) -> Blob:
        data = _json(doc)
        digest = self._blob(data)
        self.refs[digest] = refs
        self._revision(digest)
        return Blob(digest, len(data), doc["mediaType"])

    def multi_arch(self, docker: bool) -> Blob:
        children = [self.image(docker, "amd64"), self.image(docker, "arm64", "v8")]
        doc = {"schemaVersion": 2, "mediaType": DOCKER_LIST if docker else OCI_INDEX,
               "manifests": [c.descriptor(platform=c.platform) for c in children]}
        return self._manifest(doc, [c.digest for c in children])

    def referrer(self, subject: Blob) -> Blob:
        self._layer_link(sha256_digest(EMPTY_JSON))
        sbom = json.dumps({"spdxVersion": "SPDX-2.3", "name": self.name,
                           "id": self.rng.getrandbits(64)}).encode()
        sbom_digest = self._blob(sbom)
        self._layer_link(sbom_digest)
        doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": SBOM_TYPE,
               "config": {"mediaType": OCI_EMPTY, "size": 2, "digest": sha256_digest(EMPTY_JSON)},
               "layers": [{"mediaType": SBOM_TYPE, "size": len(sbom), "digest": sbom_digest}],
               "subject": {"mediaType": subject.media_type, "size": subject.size,
                           "digest": subject.digest}}
        manifest = self._manifest(doc, [sha256_digest(EMPTY_JSON), sbom_digest])
        self.subjects[manifest.digest] = subject.digest
        return manifest

    def upload(self) -> None:
        size = self.rng.choice((0, 777, 3000, 9000))  # hash states are computed in Python
        data = self.rng.randbytes(size)
        upload_id = str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
        stale = self.rng.random() < 0.5
        started = STALE_STARTEDAT if stale else datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        path = f"{self.base}/_uploads/{upload_id}"
        self.w.write(f"{path}/startedat", started.encode())
        self.w.write(f"{path}/data", data)
        self.w.write(f"{path}/hashstates/sha256/0", go_sha256_state(b""))
        if size:
            self.w.write(f"{path}/hashstates/sha256/{size}", go_sha256_state(data))
        total = size + 108 * (2 if size else 1)
        self.result.uploads.append((self.name, upload_id, total, stale))

    # -- the repository ----------------------------------------------------------------
    def build(self) -> RepoResult:
        cfg, i = self.config, self.index
        self.w.mkdirs(f"{self.base}/_uploads")  # left empty by every finished upload
        first: Blob | None = None
        for t in range(cfg.tags_per_repo):
            docker = (i + t) % 2 == 0
            tag = "latest" if t == 0 else f"v{t}.0"
            if _every(cfg.history_every, i * cfg.tags_per_repo + t):
                old = self.image(docker)
                self.w.link(f"{self.base}/_manifests/tags/{tag}/index/sha256/{old.digest[7:]}",
                            old.digest)
                self.result.untagged.append(old.digest)
            image = self.image(docker)
            self._tag(tag, image.digest)
            first = first or image
        if _every(cfg.index_every, i):
            self._tag("multi", self.multi_arch(docker=i % 2 == 0).digest)
        if first is not None and _every(cfg.referrer_every, i):
            self.referrer(first)
        if _every(cfg.deleted_every, i):
            doomed = self.image(i % 2 == 1)
            # DELETE by digest: the revision link file goes, its directory and blobs stay.
            self.w.remove(f"{self.base}/_manifests/revisions/sha256/{doomed.digest[7:]}/link")
            self.w.link_files -= 1
            self.revisions.discard(doomed.digest)
            self.result.manifests -= 1
            self.result.deleted += 1
        if _every(cfg.orphan_every, i):
            self._upload_layer(docker=True)
        if _every(cfg.upload_every, i):
            self.upload()
        self._conclude()
        return self.result

    def _reach(self, roots: Iterable[str]) -> set[str]:
        seen: set[str] = set()
        stack = list(roots)
        while stack:
            digest = stack.pop()
            if digest not in seen:
                seen.add(digest)
                stack.extend(self.refs.get(digest, ()))
        return seen

    def _conclude(self) -> None:
        live = self._reach(self.revisions)
        tagged = self._reach(self.result.tags.values())
        kept_referrers = [r for r, s in self.subjects.items() if s in tagged and r in self.revisions]
        tagged |= self._reach(kept_referrers)
        res = self.result
        res.unreferenced = {d for d in self.local if d not in live}
        res.untagged_unreachable = {d for d in self.local if d not in tagged}
        res.unreferenced_bytes = sum(self.local[d] for d in res.unreferenced)
        res.shared_rev = live & self.shared
        res.shared_tag = tagged & self.shared
        res.untagged = [d for d in res.untagged if d not in tagged]


# --------------------------------------------------------------------------- driver

_CHAINS: list[list[Blob]] = []
_SHARED: set[str] = set()


def _build_range(args: tuple[str, SynthConfig, list[int]]) -> tuple[list[RepoResult], dict[str, int]]:
    v2, config, indexes = args
    writer = TreeWriter(v2)
    writer.made.update(_premade(config))
    results = [RepoBuilder(writer, config, i, _CHAINS, _SHARED).build() for i in indexes]
    counts = {"files": writer.files, "dirs": writer.dirs, "bytes": writer.bytes,
              "blob_files": writer.blob_files, "link_files": writer.link_files}
    return results, counts


def _premade(config: SynthConfig) -> Iterator[str]:
    yield "blobs"
    yield "blobs/sha256"
    yield "repositories"
    for n in range(256):
        yield f"blobs/sha256/{n:02x}"


def _chunks(items: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def generate(root: str | os.PathLike[str], config: SynthConfig, *, jobs: int = 1) -> SynthResult:
    """Write the tree under `root` (which must not hold one yet) and describe it."""
    global _CHAINS, _SHARED
    started = time.perf_counter()
    root = os.fspath(root)
    v2 = os.path.join(root, V2)
    if os.path.exists(v2):
        raise FileExistsError(f"{v2} already exists; generate into an empty root")
    os.makedirs(v2)
    writer = TreeWriter(v2)
    for rel in _premade(config):
        writer.mkdirs(rel)
    chains = []
    for chain in base_chains(config):
        chains.append([Blob(writer.blob(data), blob.size, "", blob.diff_id) for data, blob in chain])
    shared = {b.digest for chain in chains for b in chain}
    shared_sizes = {b.digest: b.size for chain in chains for b in chain}
    if config.referrer_every:
        shared.add(writer.blob(EMPTY_JSON))
        shared_sizes[sha256_digest(EMPTY_JSON)] = len(EMPTY_JSON)
    _CHAINS, _SHARED = chains, shared
    indexes = list(range(config.repositories))
    work = [(v2, config, chunk) for chunk in _chunks(indexes, 32)]
    result = SynthResult(root=root, config=asdict(config))
    totals = {"files": writer.files, "dirs": writer.dirs, "bytes": writer.bytes,
              "blob_files": writer.blob_files, "link_files": writer.link_files}
    if jobs > 1 and len(work) > 1:
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            parts = list(pool.imap(_build_range, work))
    else:
        parts = [_build_range(item) for item in work]
    shared_rev: set[str] = set()
    shared_tag: set[str] = set()
    for repos, counts in parts:
        for key, value in counts.items():
            totals[key] += value
        for repo in repos:
            result.repositories.append(repo.name)
            result.tags[repo.name] = repo.tags
            result.manifests += repo.manifests
            result.untagged_revisions += [(repo.name, d) for d in repo.untagged]
            result.unreferenced |= repo.unreferenced
            result.untagged_unreachable |= repo.untagged_unreachable
            result.unreferenced_bytes += repo.unreferenced_bytes
            result.uploads += repo.uploads
            result.deleted_revision_dirs += repo.deleted
            shared_rev |= repo.shared_rev
            shared_tag |= repo.shared_tag
    for digest in shared - shared_rev:
        result.unreferenced.add(digest)
        result.unreferenced_bytes += shared_sizes[digest]
    result.untagged_unreachable |= shared - shared_tag
    for key, value in totals.items():
        setattr(result, key, value)
    result.seconds = time.perf_counter() - started
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", help="storage root to create (gets docker/registry/v2)")
    parser.add_argument("--files", type=int, default=100_000, help="about this many files")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--layer-size", type=int, action="append",
                        help="random payload bytes per layer (repeat to cycle sizes)")
    parser.add_argument("--summary", help="write the SynthResult as JSON to this file")
    parser.add_argument("--force", action="store_true", help="remove ROOT first")
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {"seed": args.seed}
    if args.layer_size:
        overrides["layer_sizes"] = tuple(args.layer_size)
    config = SynthConfig.for_files(args.files, **overrides)
    if args.force and os.path.exists(args.root):
        shutil.rmtree(args.root)
    result = generate(args.root, config, jobs=args.jobs)
    print(f"{result.files} files, {result.dirs} dirs, {result.bytes / 1e6:.1f} MB in "
          f"{len(result.repositories)} repositories, {result.manifests} manifests; "
          f"{len(result.unreferenced)} unreferenced blobs; {result.seconds:.1f}s", file=sys.stderr)
    if args.summary:
        with open(args.summary, "w") as fh:
            json.dump(result.to_json(), fh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
