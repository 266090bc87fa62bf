"""May regfsck change this tree now? Who else may be using it, and the lock between regfsck runs.

A registry serving ROOT while regfsck moves files would lose pushes and serve stale
answers, so every mutating command first takes an exclusive lock (two regfsck runs never
mutate one root at once) and then looks through /proc for anything that may be using
ROOT: processes with a file open or their working directory below it, and registry
processes whose configuration points at it (an idle registry holds no file open, so the
first check alone is not enough). Our own process and its ancestors (the shell waiting
for us) are never counted.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import stat as stat_module
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, TypeVar

from regfsck.errors import RegfsckError
from regfsck.layout import STATE_DIR, V2_PREFIX
from regfsck.root import ROOTDIR_ENV, RegistryRoot
from regfsck.storage import FilesystemStorage, StorageError

if TYPE_CHECKING:
    from regfsck.objectstore import ObjectLock

LOCK_DIR = STATE_DIR
LOCK_FILE = "lock"
REGISTRY_BINARIES = frozenset({"registry", "docker-registry"})
CONFIG_ENV = "REGISTRY_CONFIGURATION_PATH"
DEFAULT_ROOTDIR = "/var/lib/registry"
MAX_CONFIG_BYTES = 1 << 20
MAX_REPORTED = 10
MAX_DEPTH = 64  # path components walked up when asking whether a path lies in ROOT
PF_KTHREAD = 0x00200000  # /proc/PID/stat flags: a kernel thread (never opens ROOT for a user)
CAP_SYS_PTRACE = 19
CAP_DAC_OVERRIDE = 1
CAP_DAC_READ_SEARCH = 2
# Environment values that say where a process was started, not what it uses (its cwd is checked).
IGNORED_ENV = frozenset({"PWD", "OLDPWD", "_"})
NOT_DRIVERS = frozenset({"delete", "maintenance", "cache", "redirect", "tag"})
T = TypeVar("T")


class SafetyError(RegfsckError):
    """Changing the tree now is not safe; the message says what blocks and how to proceed."""


class LockHeldError(SafetyError):
    """Another regfsck run holds the root's lock."""


class _Gone(Exception):
    """The process exited while it was looked at: it uses nothing."""


class _Hidden(Exception):
    """Part of the process cannot be read (permissions): what it uses is unknown."""


@dataclass(frozen=True, slots=True)
class _Identity:
    """A directory by device and inode: survives bind mounts and other mount namespaces."""

    dev: int
    ino: int


def _identity(path: str) -> _Identity | None:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return _Identity(st.st_dev, st.st_ino)


def _from_proc(read: Callable[[Path | str], T], path: Path | str) -> T:
    """`read(path)` of a /proc entry; _Gone when the process has exited, _Hidden when it
    is not ours to read (one answer for files and links alike)."""
    try:
        return read(path)
    except (FileNotFoundError, ProcessLookupError) as exc:
        raise _Gone from exc
    except PermissionError as exc:
        raise _Hidden(str(path)) from exc
    except OSError as exc:
        if exc.errno in (errno.ESRCH, errno.ENOENT):
            raise _Gone from exc
        raise _Hidden(str(path)) from exc


def _read_bytes(path: Path | str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def _proc_read(path: Path | str) -> bytes:
    """A /proc file's content (see `_from_proc`)."""
    return _from_proc(_read_bytes, path)


def _proc_link(path: Path | str) -> str:
    """A /proc link's target (see `_from_proc`)."""
    return _from_proc(os.readlink, path)


def _unescape_mount(field: str) -> str:
    """Mount paths in mountinfo escape space, tab, newline and backslash as octal."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


@dataclass(frozen=True, slots=True)
class _Mount:
    dev: tuple[int, int]
    root: str  # the path inside its filesystem that is mounted
    point: str  # where it is mounted, as the process sees it


def _mounts(text: str) -> list[_Mount]:
    mounts: list[_Mount] = []
    for line in text.splitlines():
        fields = line.split(" ")
        if len(fields) < 5:
            continue
        major, _, minor = fields[2].partition(":")
        try:
            dev = (int(major), int(minor))
        except ValueError:
            continue
        mounts.append(_Mount(dev, _unescape_mount(fields[3]), _unescape_mount(fields[4])))
    return mounts


_STANDARD_STREAMS = {"/dev/stdin": "fd/0", "/dev/stdout": "fd/1", "/dev/stderr": "fd/2"}


def _own_path(path: str) -> str | None:
    """For a normalised absolute path that names a process's own things, the same path
    below its /proc/PID directory ("" for the directory itself); None for any other."""
    if path in _STANDARD_STREAMS:
        return _STANDARD_STREAMS[path]
    for prefix, below in (("/dev/fd", "fd"), ("/proc/self", ""), ("/proc/thread-self", "")):
        if path == prefix or path.startswith(prefix + "/"):
            rest = path[len(prefix):].lstrip("/")
            return "/".join(p for p in (below, rest) if p)
    return None


def _inside(path: str, top: str) -> bool:
    return top == "/" or path == top or path.startswith(top.rstrip("/") + "/")


@dataclass(frozen=True, slots=True)
class _Target:
    """ROOT as a process elsewhere may see it: by identity, by our paths, by its filesystem."""

    identities: frozenset[_Identity]  # ROOT, docker/, docker/registry/, v2/
    prefixes: tuple[str, ...]  # ROOT's paths in our mount namespace (kernel-canonical)
    dev: tuple[int, int]  # ROOT's device (major, minor)
    fs_path: str | None  # ROOT's path inside its filesystem (a bind mount of it shows this)
    mnt_ns: str | None  # our mount namespace
    own_mounts: frozenset[tuple[str, str]]  # (root, point) of our mounts of ROOT's device

    @classmethod
    def of(cls, root: RegistryRoot, proc: Path) -> _Target:
        levels = [str(root.root)]
        for part in V2_PREFIX.split("/"):
            levels.append(f"{levels[-1]}/{part}")
        identities = frozenset(i for i in map(_identity, levels) if i is not None)
        real_root = os.path.realpath(root.root)
        prefixes = tuple(dict.fromkeys((real_root, os.path.realpath(root.v2),
                                        os.path.abspath(root.root))))
        st = os.stat(root.root)
        dev = (os.major(st.st_dev), os.minor(st.st_dev))
        fs_path = None
        own: set[tuple[str, str]] = set()
        with contextlib.suppress(_Gone, _Hidden):
            best: _Mount | None = None
            for mount in _mounts(_proc_read(proc / "self/mountinfo").decode("utf-8", "replace")):
                if mount.dev == dev:
                    own.add((mount.root, mount.point))
                if mount.dev == dev and _inside(real_root, mount.point) and (
                        best is None or len(mount.point) >= len(best.point)):
                    best = mount
            if best is not None:
                rel = os.path.relpath(real_root, best.point)
                fs_path = os.path.normpath(os.path.join(best.root, rel)) if rel != "." else best.root
        mnt_ns = None
        with contextlib.suppress(_Gone, _Hidden):
            mnt_ns = _proc_link(proc / "self/ns/mnt")
        return cls(identities, prefixes, dev, fs_path, mnt_ns, frozenset(own))


def _privileged() -> bool:
    """May we look into every process? That takes CAP_SYS_PTRACE (other credentials) and a
    DAC capability (another user's /proc/PID/fd is mode 0500): root normally; not root
    run without the DAC capabilities, which then sees only its own uid's processes."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("CapEff:"):
                    caps = int(line.split()[1], 16)
                    dac = caps >> CAP_DAC_OVERRIDE & 1 or caps >> CAP_DAC_READ_SEARCH & 1
                    return bool(caps >> CAP_SYS_PTRACE & 1 and dac)
    except (OSError, ValueError, IndexError):
        pass
    return os.geteuid() == 0


@dataclass(slots=True)
class _ProcStat:
    ppid: int
    state: str
    flags: int


def _proc_stat(proc_dir: Path) -> _ProcStat | None:
    try:
        text = (proc_dir / "stat").read_text(errors="replace")
        fields = text.rsplit(")", 1)[1].split()
        return _ProcStat(int(fields[1]), fields[0], int(fields[6]))
    except (OSError, ValueError, IndexError):
        return None


def _excluded(proc: Path, stats: dict[int, _ProcStat]) -> set[int]:
    """Our own process tree: our ancestors (the shell waiting for us) and our forks
    (hashing workers), plus kernel threads and zombies, which use no files."""
    pids = {pid for pid, st in stats.items() if st.flags & PF_KTHREAD or st.state in ("Z", "X")}
    pid = os.getpid()
    seen: set[int] = set()
    while pid > 0 and pid not in seen:
        seen.add(pid)
        st = stats.get(pid) or _proc_stat(proc / str(pid))
        if st is None:
            break
        pid = st.ppid
    children: dict[int, list[int]] = {}
    for child, st in stats.items():
        children.setdefault(st.ppid, []).append(child)
    own_args = _cmdline(proc / "self")
    stack = [os.getpid()]
    while stack:  # forks of ours only: a process we started for another purpose still counts
        for child in children.get(stack.pop(), []):
            if child not in seen and _cmdline(proc / str(child)) == own_args:
                seen.add(child)
                stack.append(child)
    return pids | seen


def _cmdline(proc_dir: Path) -> bytes | None:
    try:
        return (proc_dir / "cmdline").read_bytes()
    except OSError:
        return None


def _uid(proc_dir: Path) -> int | None:
    """The effective uid; None when unknown. _Gone when the process has exited: a process
    that ends while we look at it uses nothing."""
    with contextlib.suppress(_Hidden, ValueError, IndexError):
        for line in _proc_read(proc_dir / "status").decode("ascii", "replace").splitlines():
            if line.startswith("Uid:"):
                return int(line.split()[2])  # effective
    return None


def _split_env(raw: bytes) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            env[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
    return env


def _config_rootdir(text: str) -> tuple[bool, str | None]:
    """(uses the filesystem driver, its rootdirectory) from a registry config's text."""
    import yaml  # only when a config is found: not at start-up

    config = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # a safe loader
    storage = config.get("storage") if isinstance(config, dict) else None
    if not isinstance(storage, dict):
        return False, None
    drivers = [k for k in storage if k not in NOT_DRIVERS]
    if "filesystem" not in storage and drivers:
        return False, None
    fs = storage.get("filesystem")
    if isinstance(fs, dict) and fs.get("rootdirectory") is not None:
        return True, str(fs["rootdirectory"])
    return True, None


def _serve_config_arg(args: list[str]) -> str | None:
    """The config path given after `serve` on a registry command line, if any."""
    try:
        index = args.index("serve")
    except ValueError:
        return None
    for arg in args[index + 1:]:
        if not arg.startswith("-"):
            return arg
    return None


def is_registry_serve(args: list[str]) -> bool:
    """True for `registry serve ...` / `docker-registry serve ...` command lines."""
    return bool(args) and os.path.basename(args[0]) in REGISTRY_BINARIES and "serve" in args[1:]


class _Process:
    """One process, its paths resolved as it sees them (through /proc/PID/root when it
    lives in another mount namespace or a chroot)."""

    def __init__(self, pid: int, proc: Path, target: _Target,
                 cache: dict[str, bool] | None = None) -> None:
        self.pid = pid
        self.cache = {} if cache is None else cache
        self.dir = f"{proc}/{pid}"
        self.target = target
        self.args = [a.decode("utf-8", "replace")
                     for a in _proc_read(f"{self.dir}/cmdline").split(b"\0") if a]
        self.hidden: list[str] = []
        try:
            ns = _proc_link(f"{self.dir}/ns/mnt")
            self.same_ns: bool | None = ns == target.mnt_ns
        except _Hidden as exc:
            self.same_ns = None  # unknown: paths are tried as we see them
            self.hidden.append(str(exc))
        try:
            root_link = _proc_link(f"{self.dir}/root")
        except _Hidden as exc:
            root_link = "/"
            self.hidden.append(str(exc))
        self.direct = self.same_ns is not False and root_link == "/"
        self.cwd: str | None = None
        try:
            self.cwd = _proc_link(f"{self.dir}/cwd").removesuffix(" (deleted)")
        except _Hidden as exc:
            self.hidden.append(str(exc))
        self._env: dict[str, str] | None = None

    def absolute(self, path: str) -> str:
        """`path` as an absolute path in the process's own view (relative to its cwd)."""
        if path.startswith("/") or self.cwd is None:
            return path
        return os.path.join(self.cwd, path)

    def view(self, path: str) -> str:
        """Our path to the file the process means by `path` (absolute or relative to its cwd).

        `/dev/fd/N`, `/dev/stdin` and `/proc/self/...` name the process's own descriptors
        and files: read from here they would be ours (our root lock, the tree we hold
        open), so they are read through its /proc directory instead."""
        path = self.absolute(path)
        if not path.startswith("/"):
            return f"{self.dir}/cwd/{path}"
        path = os.path.normpath(path)
        own = _own_path(path)
        if own is not None:
            return f"{self.dir}/{own}" if own else self.dir
        return path if self.direct else f"{self.dir}/root{path}"

    def reaches(self, path: str) -> bool:
        """Does `path` (as the process sees it) lead into ROOT? By identity, walking up."""
        seen = self.view(path)
        if not self.absolute(path).startswith("/"):
            return _identity(seen) in self.target.identities
        if self.direct:  # our own view: many processes name the same paths (HOME, PATH)
            known = self.cache.get(seen)
            if known is None:
                known = self.cache[seen] = self._walk_up(seen, "/")
            return known
        return self._walk_up(seen, f"{self.dir}/root")

    def _walk_up(self, current: str, stop: str) -> bool:
        for _ in range(MAX_DEPTH):
            if _identity(current) in self.target.identities:
                return True
            if current in (stop, "/"):
                return False
            current = os.path.dirname(current)
        return False

    def env(self) -> dict[str, str]:
        if self._env is None:
            self._env = _split_env(_proc_read(f"{self.dir}/environ"))
        return self._env

    # -- the ways a process reaches ROOT --------------------------------------------
    def mounted(self) -> tuple[str | None, bool]:
        """(why its mounts hold ROOT, whether it can reach ROOT's filesystem at all).

        Only asked for a process in another mount namespace (a container, a service with
        private mounts): a mount of ROOT or of anything inside it is use, unless it is the
        very mount we have (same root, same place: inherited, as by systemd's PrivateTmp
        services; what such a process does there is judged like any process of ours). A
        namespace without ROOT's filesystem cannot reach ROOT by any path."""
        if self.target.fs_path is None:
            return None, True
        text = _proc_read(f"{self.dir}/mountinfo").decode("utf-8", "replace")
        reach = False
        for mount in _mounts(text):
            if mount.dev != self.target.dev:
                continue
            inherited = (mount.root, mount.point) in self.target.own_mounts
            if _inside(mount.root, self.target.fs_path) and not inherited:
                return f"its mount namespace has ROOT mounted at {mount.point}", True
            if _inside(self.target.fs_path, mount.root) or _inside(mount.root, self.target.fs_path):
                reach = True
        return None, reach

    def open_files(self) -> str | None:
        prefixes = self.target.prefixes
        if self.cwd is not None and (_under(self.cwd, prefixes) or (
                not self.direct and self.reaches(self.cwd))):
            return f"working directory {self.cwd}"
        if not self.direct and self.same_ns is not False:  # chrooted in our namespace
            with contextlib.suppress(_Hidden):
                link = _proc_link(f"{self.dir}/root")
                if _under(link, prefixes) or self.reaches(link):
                    return f"root directory {link}"
        try:
            fds = os.listdir(f"{self.dir}/fd")
        except (FileNotFoundError, ProcessLookupError) as exc:
            raise _Gone from exc
        except OSError as exc:
            self.hidden.append(f"{self.dir}/fd ({exc.strerror})")
            return None
        for fd in fds:
            try:
                target = os.readlink(f"{self.dir}/fd/{fd}")
            except OSError:
                continue
            if not target.startswith("/"):
                continue  # pipe:, socket:, anon_inode:
            target = target.removesuffix(" (deleted)")
            if _under(target, prefixes) or (not self.direct and self.reaches(target)):
                return f"has {target} open"
        return None

    def configured(self) -> str | None:
        """A registry configuration among its arguments or environment that stores in ROOT."""
        try:
            env = self.env()
        except _Hidden as exc:
            self.hidden.append(str(exc))
            env = {}
        override = env.get(ROOTDIR_ENV)
        if override and self.reaches(override):
            return f"a registry serving this root (rootdirectory {override}, from environment {ROOTDIR_ENV})"
        candidates = [env[CONFIG_ENV]] if env.get(CONFIG_ENV) else []
        for arg in self.args[1:]:
            value = arg.partition("=")[2] if arg.startswith("-") else arg
            if value:
                candidates.append(value)
        for candidate in dict.fromkeys(candidates):
            text = self._config_text(candidate)
            if not text:
                continue
            import yaml  # only when a file looks like a registry config: not at start-up

            try:
                uses_fs, rootdir = _config_rootdir(text)
            except (yaml.YAMLError, AttributeError, RecursionError, ValueError):
                continue
            if not uses_fs or override:
                continue
            rootdir = rootdir or DEFAULT_ROOTDIR
            if self.reaches(rootdir):
                return f"a registry serving this root (rootdirectory {rootdir}, from config {candidate})"
        if is_registry_serve(self.args) and not override:
            # A process named like the registry whose configuration we cannot read: unknown.
            config = _serve_config_arg(self.args) or env.get(CONFIG_ENV)
            if not config:
                return "a registry process without a config path regfsck can find"
            if self._config_text(config) is None:  # judged like any uninspectable process
                self.hidden.insert(0, f"its config {config}")
        return None

    def _config_text(self, candidate: str) -> str | None:
        """The text of a file argument that may be a registry config storing on a filesystem:
        "" when it is not one, None when it cannot be read."""
        seen = self.view(candidate)
        try:
            fd = os.open(seen, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM) and (
                    candidate.endswith((".yml", ".yaml")) or is_registry_serve(self.args)):
                self.hidden.append(f"{candidate} ({exc.strerror})")
            return None
        try:
            st = os.fstat(fd)
            if not stat_module.S_ISREG(st.st_mode) and is_registry_serve(self.args):
                return None  # `serve <(...)`: a pipe read once by the registry, not by us
            if not stat_module.S_ISREG(st.st_mode) or st.st_size > MAX_CONFIG_BYTES:
                return ""
            data = os.read(fd, MAX_CONFIG_BYTES)
        except OSError:
            return None
        finally:
            os.close(fd)
        if b"storage" not in data or b"filesystem" not in data or b"\0" in data:
            return ""  # not a registry config storing on a filesystem (or not text)
        return data.decode("utf-8", "replace")

    def path_values(self) -> str | None:
        """Arguments and environment values that are paths into ROOT (`rsync /srv/registry`,
        `DATA=/srv/registry`, any REGISTRY_* path)."""
        for arg in self.args[1:]:
            value = arg.partition("=")[2] if arg.startswith("-") else arg
            if value.startswith("/") and self.reaches(value):
                return f"argument {arg}"
        try:
            env = self.env()
        except _Hidden:
            return None
        for key, value in env.items():
            if key in IGNORED_ENV or not value.startswith("/"):
                continue
            if self.reaches(value):
                return f"environment {key}={value}"
        return None

    def describe(self) -> str:
        if self.args:
            shown = " ".join(self.args)
        else:
            try:
                shown = _proc_read(f"{self.dir}/comm").decode("utf-8", "replace").strip()
            except (_Gone, _Hidden):
                shown = "?"
        if len(shown) > 80:
            shown = shown[:77] + "..."
        return f"pid {self.pid} ({shown})"


def _under(path: str, prefixes: tuple[str, ...]) -> bool:
    path = path.removesuffix(" (deleted)")
    return any(path == p or path.startswith(p + "/") for p in prefixes)


def _why_user(process: _Process, privileged: bool, owner_uid: int | None) -> str | None:
    """Why `process` may be using ROOT, or None when it cannot be."""
    if process.same_ns is False:
        reason, reach = process.mounted()
        if reason is not None:
            return reason
        if not reach:
            return None  # ROOT's filesystem is not in its namespace at all
    reason = process.open_files() or process.configured() or process.path_values()
    if reason is not None:
        return reason
    if process.hidden:
        now = _proc_stat(Path(process.dir))
        if now is None or now.state in ("Z", "X"):
            raise _Gone  # it ended while we looked: what failed to read was its exit
        uid = _uid(Path(process.dir))
        if privileged or uid is None or uid == owner_uid:
            return _unseen(process.hidden[0])
    return None


UNSEEN = "a process regfsck cannot see into counts as a user"


def _unseen(what: str) -> str:
    return f"cannot be inspected ({what} is not readable); {UNSEEN}"


# A process can be unreadable for a moment, even to root: in the middle of an exec (its
# credentials and memory being replaced) /proc answers EACCES. One that could not be
# seen into is looked at once more, this long after, before it counts as a user.
RELOOK_AFTER_S = 0.05


def _user(pid: int, proc: Path, target: _Target, cache: dict[str, bool], privileged: bool,
          owner_uid: int | None) -> tuple[str, bool] | None:
    """Why process `pid` may be using ROOT, described, and whether only because it could
    not be seen into; None when it cannot be using ROOT (or has ended)."""
    try:
        process = _Process(pid, proc, target, cache)
        reason = _why_user(process, privileged, owner_uid)
        if reason is None:
            return None
        return f"{process.describe()}: {reason}", reason.endswith(UNSEEN)
    except _Gone:
        return None
    except _Hidden as exc:
        try:
            uid = _uid(proc / str(pid))
        except _Gone:
            return None
        if privileged or uid is None or uid == owner_uid:
            return f"pid {pid}: {_unseen(str(exc))}", True
        return None


# -- object storage: the registry's own answer instead of /proc ----------------------------

PROBE_REPOSITORY = "regfsck/probe"  # any valid name: the route answers for every repository
PROBE_TIMEOUT_S = 5.0
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
API_VERSION_HEADER = "Docker-Distribution-Api-Version"
DOWN, READ_ONLY, WRITABLE, UNKNOWN = "down", "read-only", "writable", "unknown"


@dataclass(frozen=True, slots=True)
class RegistryState:
    """What a registry's HTTP API says of it: `down` and `read-only` allow changes."""

    url: str
    state: str
    detail: str

    @property
    def allows_changes(self) -> bool:
        return self.state in (DOWN, READ_ONLY)


def _probe_url(url: str) -> str:
    """`OPTIONS` target for a registry base URL (`https://host[:port]`, `/v2/` accepted)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SafetyError(f"--registry-url {url!r} is not an http(s)://HOST[:PORT] URL")
    path = parts.path.rstrip("/")
    path = path.removesuffix("/v2")
    return f"{parts.scheme}://{parts.netloc}{path}/v2/{PROBE_REPOSITORY}/blobs/uploads/"


def registry_url_state(url: str, timeout: float = PROBE_TIMEOUT_S) -> RegistryState:
    """Ask a registry, without writing anything, whether it can write to its storage now.

    `OPTIONS /v2/<repo>/blobs/uploads/` is routed by every registry without touching
    storage; its `Allow` header lists the methods the route takes. Measured on 2.8.2 and
    3.1.1: `DELETE, GET, HEAD, PATCH, POST, PUT` when writable, `GET, HEAD` in read-only
    maintenance mode (`storage.maintenance.readonly.enabled`, where POST answers 405).
    A refused connection is a stopped registry. Anything else (a timeout, an auth
    challenge, a proxy's error page, an answer without the registry's API header) cannot
    tell, and counts as a registry that may write."""
    import socket
    import urllib.error
    import urllib.request
    from urllib.parse import urlsplit

    target = _probe_url(url)
    host = urlsplit(target).hostname or ""
    handlers: list[urllib.request.BaseHandler] = []
    if host in ("127.0.0.1", "localhost", "::1"):
        handlers.append(urllib.request.ProxyHandler({}))
    opener = urllib.request.build_opener(*handlers)
    request = urllib.request.Request(target, method="OPTIONS")
    try:
        with opener.open(request, timeout=timeout) as response:
            status, headers = response.status, response.headers
    except urllib.error.HTTPError as exc:
        return RegistryState(url, UNKNOWN, f"answered {exc.code} {exc.reason} to OPTIONS "
                             f"{target}: cannot tell whether it writes")
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, ConnectionRefusedError):
            return RegistryState(url, DOWN, "refuses connections (stopped)")
        if isinstance(reason, socket.timeout | TimeoutError):
            return RegistryState(url, UNKNOWN, f"did not answer within {timeout:g}s: cannot "
                                 "tell whether it is down")
        return RegistryState(url, UNKNOWN, f"cannot be asked ({reason}): cannot tell whether "
                             "it is down")
    except (TimeoutError, OSError) as exc:
        if isinstance(exc, ConnectionRefusedError):
            return RegistryState(url, DOWN, "refuses connections (stopped)")
        return RegistryState(url, UNKNOWN, f"cannot be asked ({exc}): cannot tell whether it "
                             "is down")
    if headers.get(API_VERSION_HEADER) is None:
        return RegistryState(url, UNKNOWN, f"answered OPTIONS {target} without the "
                             f"{API_VERSION_HEADER} header: not a registry's answer")
    allow = {m.strip().upper() for m in (headers.get("Allow") or "").split(",") if m.strip()}
    if status != 200 or not allow:
        return RegistryState(url, UNKNOWN, f"answered {status} without an Allow header: "
                             "cannot tell whether it writes")
    writes = sorted(allow & WRITE_METHODS)
    if writes:
        return RegistryState(url, WRITABLE, f"accepts {', '.join(writes)} (writable)")
    return RegistryState(url, READ_ONLY, "is in read-only mode (Allow: "
                         f"{', '.join(sorted(allow))})")


NO_REGISTRY_URL = (
    "no --registry-url given: regfsck cannot see the processes of a registry storing in "
    "object storage, so it must ask each registry serving this bucket whether it is stopped "
    "or read-only")


def object_storage_users(root: RegistryRoot) -> list[str]:
    """What may be writing to a tree in object storage: each --registry-url that is neither
    down nor read-only (all of them asked, every time), or the lack of any URL."""
    users: list[str] = []
    if root.s3 is not None:
        from regfsck.objectstore import held_lock

        lock = held_lock(root.s3)
        if lock is not None and lock.lost is not None:
            users.append(f"another regfsck run: {lock.lost}")
    if not root.registry_check:
        return users  # --no-registry-check: the operator's word (docs/s3.md, the risk)
    if not root.registry_urls:
        return [*users, NO_REGISTRY_URL]
    for url in root.registry_urls:
        state = registry_url_state(url)
        if not state.allows_changes:
            users.append(f"the registry at {url}, which {state.detail}"
                         if state.state == WRITABLE else f"the registry at {url}: it {state.detail}")
    return users


def registry_users(root: RegistryRoot, proc: Path = Path("/proc")) -> list[str]:
    """Human descriptions of processes that may be using ROOT (empty when none is seen).

    On object storage there are no processes to see: the registries named with
    --registry-url are asked instead (`object_storage_users`).

    Whatever its name, a process counts when its mount namespace holds ROOT (a container
    with ROOT bind-mounted), its working or root directory or an open file is in ROOT,
    a registry configuration among its arguments or environment stores in ROOT, or an
    argument or environment value is a path into ROOT. Paths are compared by device and
    inode, looked up as the process sees them. A process that cannot be inspected counts
    too; unprivileged, regfsck can only inspect its own user's processes, so there it
    counts those of the tree's owner (docs/invariants.md, M2)."""
    if root.is_object_storage:
        return object_storage_users(root)
    try:
        target = _Target.of(root, proc)
    except OSError:
        return []
    try:
        pids = sorted(int(name) for name in os.listdir(proc) if name.isdigit())
    except OSError:
        return []
    stats = {pid: st for pid in pids if (st := _proc_stat(proc / str(pid))) is not None}
    ignored = _excluded(proc, stats)
    privileged = _privileged()
    try:
        owner_uid: int | None = os.stat(root.v2).st_uid
    except OSError:
        owner_uid = None
    users: list[str] = []
    cache: dict[str, bool] = {}
    for pid in pids:
        if pid in ignored or pid not in stats:
            continue
        user = _user(pid, proc, target, cache, privileged, owner_uid)
        if user is not None and user[1]:
            time.sleep(RELOOK_AFTER_S)
            user = _user(pid, proc, target, cache, privileged, owner_uid)
        if user is not None:
            users.append(user[0])
    return users


class RootLock:
    """Exclusive, non-blocking `flock` on ROOT/regfsck-state/lock for one mutating run.

    The kernel drops the lock when the process dies, so a crash never leaves it stuck.
    On object storage the lock is an object created with a conditional write
    (`objectstore.ObjectLock`): nothing drops it when its holder dies, so a stale one is
    taken over only with --break-lock (`RegistryRoot.break_lock`)."""

    def __init__(self, root: RegistryRoot, command: str = "") -> None:
        self.root = root
        self.storage = FilesystemStorage(root.root)
        self.path = f"{LOCK_DIR}/{LOCK_FILE}"
        self._fd: int | None = None
        self._object: ObjectLock | None = None
        if root.s3 is not None:
            from regfsck.objectstore import ObjectLock

            self._object = ObjectLock(root.s3, command=command, break_stale=root.break_lock)

    @property
    def held(self) -> bool:
        return self._fd is not None or (self._object is not None and self._object.etag is not None)

    @property
    def broke(self) -> dict[str, object] | None:
        """The stale holder whose lock --break-lock took over (object storage), if any."""
        return self._object.broke if self._object is not None else None

    def _object_acquire(self, lock: ObjectLock) -> None:
        if lock.etag is not None:
            raise SafetyError("the root lock is already held by this run")
        try:
            lock.acquire()  # another holder: objectstore.LockHeld, a LockHeldError
        except StorageError as exc:
            raise SafetyError(f"cannot take the lock {lock.url}: {exc}") from exc

    def acquire(self) -> None:
        if self._object is not None:
            self._object_acquire(self._object)
            return
        if self._fd is not None:
            raise SafetyError("the root lock is already held by this run")
        try:
            if self.storage.stat(LOCK_DIR) is None:
                try:
                    self.storage.make_dir(LOCK_DIR, 0o755)
                except StorageError as exc:
                    if exc.errno != errno.EEXIST:
                        raise
            fd = self.storage.open_append(self.path)
        except StorageError as exc:
            raise SafetyError(f"cannot take the lock {self.root.root / self.path}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise LockHeldError(
                    f"another regfsck run is changing {self.root.root} ({self._holder()}); "
                    "wait for it to finish and run again") from exc
            raise SafetyError(f"cannot lock {self.root.root / self.path}: {exc.strerror}") from exc
        with contextlib.suppress(OSError):  # only shown to a second run; a full disk is no reason to stop
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def raise_if_held(self) -> None:
        """LockHeldError when another process holds the lock (never creates the lock file)."""
        if self._object is not None:
            self._object_raise_if_held(self._object)
            return
        if self.storage.stat(self.path) is None:
            return
        try:
            fd = self.storage.open_fd(self.path)
        except StorageError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise LockHeldError(
                    f"another regfsck run is changing {self.root.root} ({self._holder()}); "
                    "wait for it to finish and run again") from exc
        finally:
            os.close(fd)

    def _object_raise_if_held(self, lock: ObjectLock) -> None:
        try:
            found = lock.read_holder()
        except StorageError:
            return
        if found is not None:
            holder, _ = found
            raise LockHeldError(f"another regfsck run is changing {self.root.display} "
                                f"({lock.describe_holder(holder)}; lock {lock.url})")

    def _holder(self) -> str:
        try:
            text = self.storage.read_small(self.path, 64).decode("ascii", "replace").strip()
        except StorageError:
            return "holder unknown"
        return f"pid {text}" if text.isdigit() else "holder unknown"

    def release(self) -> None:
        if self._object is not None:
            with contextlib.suppress(StorageError):  # a lock left behind goes stale
                self._object.release()
            return
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.ftruncate(fd, 0)
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    def __enter__(self) -> RootLock:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def users_message(root: RegistryRoot, users: list[str]) -> str:
    """One line saying what uses ROOT and how to proceed."""
    shown = "; ".join(users[:MAX_REPORTED])
    more = f"; and {len(users) - MAX_REPORTED} more" if len(users) > MAX_REPORTED else ""
    if root.is_object_storage:
        return (f"refusing to change {root.display}: it may be in use by {shown}{more}. "
                "Stop every registry serving it or put it in read-only maintenance mode "
                "(storage.maintenance.readonly.enabled), name it with --registry-url URL, and "
                "run again (or --no-registry-check, at the risk of losing pushes made meanwhile)")
    return (f"refusing to change {root.root}: it may be in use by {shown}{more}. "
            "Stop the registry (and any process working in the tree), then run again")


def check_unused(root: RegistryRoot) -> None:
    """Raise SafetyError when anything may be using ROOT (also used between sweep phases)."""
    users = registry_users(root)
    if users:
        raise SafetyError(users_message(root, users))


@contextmanager
def mutation_guard(root: RegistryRoot, command: str = "") -> Iterator[RootLock]:
    """Hold the root lock for a mutating command, refusing while anything may use ROOT.

    A refusal touches nothing (not even the lock file is created). When the process in
    the way is another regfsck holding the lock, the refusal says so. `command` is shown
    to other runs by an object-storage lock (its holder's command)."""
    users = registry_users(root)
    if users:
        RootLock(root).raise_if_held()
        raise SafetyError(users_message(root, users))
    with RootLock(root, command) as lock:
        check_unused(root)  # again, now that no other regfsck can start
        yield lock
