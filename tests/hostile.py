"""Helpers for the hostile-input tests: run the CLI as an operator would, judge its output
strictly, damage trees, and prove that nothing outside ROOT is opened (inotify).

Used by tests/test_fuzz_*.py, test_hostile_*.py, test_interrupt_*.py, test_readonly_*.py.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import stat
import struct
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.realtools import SampleInfo
from tests.support import V2, cli

CLI_TIMEOUT = 60.0

# Running as root, permission bits do not stop reads: the CLI is then run without the two
# capabilities that bypass them, so "unreadable" damage is really unreadable.
DROP_DAC = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]


def unprivileged_prefix() -> list[str] | None:
    """Command prefix under which chmod 000 really denies reads; None if there is none."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        return None
    probe = subprocess.run([*DROP_DAC, "cat", "/proc/self/status"], capture_output=True, text=True,
                           check=False)
    return DROP_DAC if probe.returncode == 0 else None


def cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "REGFSCK_DEBUG" and not k.startswith("REGISTRY_")}
    env["COLUMNS"] = "120"
    return cli.child_env(env)


def run_cli(*args: str, prefix: Sequence[str] = (), timeout: float = CLI_TIMEOUT,
            cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run regfsck as a subprocess (bytes out: the test judges the encoding itself)."""
    return cli.run(*args, prefix=prefix, timeout=timeout, env=cli_env(), cwd=cwd, text=False,
                   stdin=subprocess.DEVNULL)


def strict_json(raw: bytes) -> Any:
    """Parse stdout as exactly one JSON object a strict parser accepts (UTF-8, no lone
    surrogates); raises AssertionError saying what is wrong."""
    text = raw.decode("utf-8")  # strict: raises on invalid UTF-8
    doc = json.loads(text)
    assert isinstance(doc, dict), f"JSON output is a {type(doc).__name__}, not an object"

    def check(value: Any) -> None:
        if isinstance(value, str):
            value.encode("utf-8")  # raises on lone surrogates
        elif isinstance(value, dict):
            for k, v in value.items():
                check(k)
                check(v)
        elif isinstance(value, list):
            for v in value:
                check(v)

    check(doc)
    return doc


def assert_clean_exit(result: subprocess.CompletedProcess[bytes], allowed: Sequence[int],
                      what: str) -> None:
    """Exit code allowed, no traceback, no internal error, stderr readable text."""
    err = result.stderr.decode("utf-8", "replace")
    assert "Traceback" not in err, f"{what}: traceback\n{err[-3000:]}"
    assert "internal error" not in err, f"{what}: {err[-2000:]}"
    assert result.returncode in allowed, (
        f"{what}: exit {result.returncode}, expected one of {list(allowed)}\n{err[-2000:]}")


# --------------------------------------------------------------------------- tree snapshots


def restore_access(root: Path) -> None:
    """Give the owner rwx back on every directory and rw on every file (test cleanup)."""
    if os.path.isdir(root) and not os.path.islink(root):
        os.chmod(root, 0o755)
    for _dirpath, dirnames, filenames, dir_fd in os.fwalk(root, follow_symlinks=False):
        for name in dirnames + filenames:
            st = os.lstat(name, dir_fd=dir_fd)
            if stat.S_ISDIR(st.st_mode):
                os.chmod(name, 0o755, dir_fd=dir_fd)
            elif stat.S_ISREG(st.st_mode):
                os.chmod(name, 0o644, dir_fd=dir_fd)


def remove_tree(root: Path) -> None:
    restore_access(root)
    shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------- inotify

_IN_ACCESS = 0x001
_IN_OPEN = 0x020
_IN_NONBLOCK = 0o4000
_EVENT = struct.Struct("iIII")


@dataclass
class OpenWatch:
    """Records every open/read of anything in the watched directories (inotify)."""

    fd: int
    names: dict[int, str]

    def events(self) -> list[str]:
        found: list[str] = []
        while True:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                return found
            offset = 0
            while offset < len(buf):
                wd, mask, _cookie, length = _EVENT.unpack_from(buf, offset)
                raw = buf[offset + _EVENT.size: offset + _EVENT.size + length].rstrip(b"\0")
                what = "open" if mask & _IN_OPEN else "read"
                found.append(f"{what} {self.names.get(wd, '?')}/{raw.decode(errors='replace')}")
                offset += _EVENT.size + length


@contextlib.contextmanager
def watch_opens(directory: Path) -> Iterator[OpenWatch]:
    """Watch `directory` and every directory below it for opens and reads."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    fd = libc.inotify_init1(_IN_NONBLOCK)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "inotify_init1 failed")
    names: dict[int, str] = {}
    try:
        for dirpath, _dirnames, _files in os.walk(directory):
            wd = libc.inotify_add_watch(fd, os.fsencode(dirpath), _IN_OPEN | _IN_ACCESS)
            if wd < 0:
                raise OSError(ctypes.get_errno(), f"inotify_add_watch {dirpath}")
            names[wd] = dirpath
        watch = OpenWatch(fd, names)
        watch.events()  # drop the events of the walk above
        yield watch
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- damage helpers


def can_mknod(directory: Path) -> bool:
    """True when this process may create device nodes (root with CAP_MKNOD)."""
    probe = directory / ".mknod-probe"
    try:
        os.mknod(probe, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.EACCES):
            return False
        raise
    probe.unlink()
    return True


def replace_with(path: Path, kind: str, *, target: str = "", data: bytes = b"") -> None:
    """Replace whatever is at `path` (file, dir, link) by a new entry of `kind`:
    file, dir, symlink, fifo, chardev (a /dev/zero node), socket-less variants only."""
    if path.is_symlink() or path.is_file() or (path.exists() and not path.is_dir()):
        path.unlink()
    elif path.is_dir():
        remove_tree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "file":
        path.write_bytes(data)
    elif kind == "dir":
        path.mkdir()
    elif kind == "symlink":
        os.symlink(target, path)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "chardev":
        os.mknod(path, 0o644 | stat.S_IFCHR, os.makedev(1, 5))
    else:
        raise ValueError(kind)


def deep_json(depth: int) -> bytes:
    """A manifest-shaped JSON document nested `depth` levels deep."""
    return b'{"schemaVersion":2,"x":' + b"[" * depth + b"]" * depth + b"}"


def padded_manifest(size: int) -> bytes:
    """A valid OCI image manifest padded with an annotation to `size` bytes."""
    head = b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",' \
           b'"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":' \
           b'"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},' \
           b'"layers":[],"annotations":{"pad":"'
    tail = b'"}}'
    return head + b"x" * max(0, size - len(head) - len(tail)) + tail


def index_of(*children: str) -> bytes:
    """An OCI index listing `children` (digests) as image manifests."""
    return json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": "application/vnd.oci.image.index.v1+json", "digest": d,
                       "size": 100, "platform": {"os": "linux", "architecture": "amd64"}}
                      for d in children]}).encode()


def sha256_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- read-only storage


def _chmod_tree_readonly(root: Path) -> None:
    for _dirpath, dirnames, filenames, dir_fd in os.fwalk(root, follow_symlinks=False):
        for name in filenames:
            if stat.S_ISREG(os.lstat(name, dir_fd=dir_fd).st_mode):
                os.chmod(name, 0o444, dir_fd=dir_fd)
        for name in dirnames:
            os.chmod(name, 0o555, dir_fd=dir_fd)
    os.chmod(root, 0o555)


@contextlib.contextmanager
def readonly_root(src: Path, scratch: Path) -> Iterator[tuple[Path, list[str]]]:
    """A read-only view of the tree `src`: (path to give regfsck, command prefix).

    Preferably a read-only bind mount (EROFS, like a snapshot or a `ro` volume); where
    mounts are not permitted, a copy made read-only with chmod, read by a process that
    permission bits bind (root without its DAC capabilities). Skips when neither works."""
    mountpoint = scratch / "ro-mount"
    mountpoint.mkdir(parents=True)
    # REGFSCK_TEST_NO_MOUNT=1 exercises the fallback where mounts are not permitted.
    bound = not os.environ.get("REGFSCK_TEST_NO_MOUNT") and subprocess.run(
        ["mount", "--bind", str(src), str(mountpoint)], capture_output=True, check=False).returncode == 0
    if bound:
        try:
            remounted = subprocess.run(["mount", "-o", "remount,bind,ro", str(mountpoint)],
                                       capture_output=True, check=False).returncode == 0
            if remounted:
                yield mountpoint, []
                return
        finally:
            if subprocess.run(["umount", str(mountpoint)], capture_output=True,
                              check=False).returncode != 0:
                subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True, check=False)
    prefix = unprivileged_prefix()
    if prefix is None:
        import pytest

        pytest.skip("neither a read-only bind mount nor permission bits can make a tree read-only here")
    copy = scratch / "ro-copy"
    shutil.copytree(src, copy, symlinks=True)
    _chmod_tree_readonly(copy)
    try:
        yield copy, prefix
    finally:
        restore_access(copy)


# --------------------------------------------------------------------------- an independent oracle

_DIGEST_RE = re.compile(rb"sha256:[0-9a-f]{64}")


def _read_regular(path: str, limit: int = 64 << 20) -> bytes | None:
    """Bytes of a regular file (never through a symlink, never blocking); None otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        chunks, total = [], 0
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                return None
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)


def _link(v2: str, rel: str) -> str | None:
    raw = _read_regular(os.path.join(v2, rel), 4096)
    return raw.decode() if raw is not None and _DIGEST_RE.fullmatch(raw) else None


def _blob(v2: str, digest: str) -> bytes | None:
    hex_part = digest.split(":", 1)[1]
    data = _read_regular(os.path.join(v2, "blobs/sha256", hex_part[:2], hex_part, "data"))
    if data is None or hashlib.sha256(data).hexdigest() != hex_part:
        return None
    return data


def why_not_pullable(root: Path, repo: str, ref: str) -> str | None:
    """Why `repo:ref` (a tag, or `@sha256:...`) could not be pulled whole (every platform)
    from this tree by the 2.8 registry, judged with plain file reads and hashlib only (not
    regfsck's code); None when it could. Symlinks count as broken."""
    v2 = os.path.join(root, V2)
    repo_dir = os.path.join("repositories", repo)
    if ref.startswith("@"):
        digest: str | None = ref[1:]
    else:
        digest = _link(v2, os.path.join(repo_dir, "_manifests/tags", ref, "current/link"))
        if digest is None:
            return f"tag {ref}: no valid current link"
    pending: list[tuple[str, int]] = [(digest, 0)]  # type: ignore[list-item]
    seen: set[str] = set()
    while pending:
        manifest, depth = pending.pop()
        if manifest in seen:
            continue
        seen.add(manifest)
        if depth > 8:
            return "indexes nested too deep"
        hex_part = manifest.split(":", 1)[1]
        if _link(v2, os.path.join(repo_dir, "_manifests/revisions/sha256", hex_part, "link")) != manifest:
            return f"{manifest}: no valid revision link"
        body = _blob(v2, manifest)
        if body is None:
            return f"{manifest}: manifest blob missing or corrupt"
        try:
            doc = json.loads(body)
        except ValueError:
            return f"{manifest}: not JSON"
        if not isinstance(doc, dict):
            return f"{manifest}: not an object"
        if isinstance(doc.get("manifests"), list):
            for child in doc["manifests"]:
                if not isinstance(child, dict) or not isinstance(child.get("digest"), str) \
                        or not _DIGEST_RE.fullmatch(child["digest"].encode()):
                    return f"{manifest}: bad child descriptor"
                pending.append((child["digest"], depth + 1))
            continue
        if doc.get("schemaVersion") == 1:
            refs = [(layer.get("blobSum"), None) for layer in doc.get("fsLayers") or []
                    if isinstance(layer, dict)]
        else:
            descriptors = [doc.get("config"), *(doc.get("layers") or [])]
            if not all(isinstance(d, dict) for d in descriptors):
                return f"{manifest}: bad descriptor"
            refs = [(d.get("digest"), d.get("size")) for d in descriptors if not d.get("urls")]
        for blob_digest, size in refs:
            if not isinstance(blob_digest, str) or not _DIGEST_RE.fullmatch(blob_digest.encode()):
                return f"{manifest}: bad reference"
            blob_hex = blob_digest.split(":", 1)[1]
            if _link(v2, os.path.join(repo_dir, "_layers/sha256", blob_hex, "link")) != blob_digest:
                return f"{blob_digest}: not linked in {repo}"
            data = _blob(v2, blob_digest)
            if data is None:
                return f"{blob_digest}: blob missing or corrupt"
            if isinstance(size, int) and len(data) != size:
                return f"{blob_digest}: size differs from the descriptor"
    return None


def intact_images(root: Path, refs: Sequence[tuple[str, str]]) -> set[tuple[str, str]]:
    """The (repo, ref) pairs of `refs` that `why_not_pullable` finds whole."""
    return {(repo, ref) for repo, ref in refs if why_not_pullable(root, repo, ref) is None}


# --------------------------------------------------------------------------- a disk that fills up


@contextlib.contextmanager
def small_filesystem(mountpoint: Path, size: str = "32m") -> Iterator[Path]:
    """A private tmpfs of `size` at `mountpoint` (skips where mounting is not permitted)."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs",
                              str(mountpoint)], capture_output=True, check=False)
    if mounted.returncode != 0:
        import pytest

        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield mountpoint
    finally:
        if subprocess.run(["umount", str(mountpoint)], capture_output=True, check=False).returncode:
            subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True, check=False)


def fill_up(filesystem: Path, leave: int) -> Path:
    """Take all free space of `filesystem` but `leave` bytes; returns the filler file."""
    filler = filesystem / "filler"
    filler.unlink(missing_ok=True)
    free = os.statvfs(filesystem)
    available = free.f_bavail * free.f_frsize
    with open(filler, "wb") as fh:
        if available > leave:
            os.posix_fallocate(fh.fileno(), 0, available - leave)
    return filler


def add_orphan_blobs(root: Path, count: int, tag: str = "orphan") -> list[str]:
    """`count` small valid blobs that nothing references (work for gc)."""
    digests = []
    for i in range(count):
        data = f"{tag} {i}".encode()
        digest = sha256_of(data)
        path = root / V2 / "blobs" / "sha256" / digest[7:9] / digest[7:] / "data"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        digests.append(digest)
    return digests


def run_many(commands: dict[str, Sequence[str]], prefix: Sequence[str] = (),
             timeout: float = CLI_TIMEOUT) -> dict[str, subprocess.CompletedProcess[bytes]]:
    """Run several CLI commands at once (they only read); each gets `timeout` seconds."""
    procs = {name: subprocess.Popen(cli.command(*args, prefix=prefix), stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=cli_env())
             for name, args in commands.items()}
    results: dict[str, subprocess.CompletedProcess[bytes]] = {}
    try:
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=timeout)
            results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


# --------------------------------------------------------------------------- runs to undo or interrupt

GC = ("--grace", "0", "--uploads-older-than", "0", "--apply")


def all_refs(info: SampleInfo) -> list[tuple[str, str]]:
    return sorted([(r, t) for r, tags in info.tags.items() for t in tags]
                  + [(r, "@" + d) for r, ds in info.revisions.items() for d in ds])


def undo_everything(root: Path, prefix: list[str] | None = None) -> None:
    """Undo every run that can be undone, newest first."""
    listed = run_cli("runs", str(root), "--json", prefix=prefix or [])
    assert_clean_exit(listed, (0,), "runs")
    doc = strict_json(listed.stdout)
    for run in sorted(doc["runs"], key=lambda r: r["run_id"], reverse=True):
        if run["status"] in ("complete", "interrupted", "running", "undoing"):
            result = run_cli("undo", str(root), run["run_id"], prefix=prefix or [])
            assert_clean_exit(result, (0,), f"undo {run['run_id']} ({run['status']})")


def journal_events(root: Path, event: str = "intent") -> int:
    """How many `event` lines the newest run's journal holds so far."""
    runs = root / "regfsck-quarantine"
    if not runs.is_dir():
        return 0
    newest = sorted(runs.iterdir())
    if not newest:
        return 0
    try:
        raw = (newest[-1] / "journal.jsonl").read_bytes()
    except FileNotFoundError:
        return 0
    return raw.count(f'"ev":"{event}"'.encode())


def signal_midway(args: list[str], root: Path, sig: signal.Signals, after: int,
                  event: str = "intent") -> subprocess.CompletedProcess[bytes]:
    """Start the CLI, wait until its journal holds `after` `event` lines, send `sig`."""
    proc = subprocess.Popen(cli.command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, env=cli_env())
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if journal_events(root, event) >= after:
                proc.send_signal(sig)
                break
            time.sleep(0.002)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(args, proc.returncode, out, err)
