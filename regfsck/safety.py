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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from regfsck.root import ROOTDIR_ENV, RegistryRoot
from regfsck.storage import FilesystemStorage, StorageError

LOCK_DIR = "regfsck-state"
LOCK_FILE = "lock"
REGISTRY_BINARIES = frozenset({"registry", "docker-registry"})
CONFIG_ENV = "REGISTRY_CONFIGURATION_PATH"
DEFAULT_ROOTDIR = "/var/lib/registry"
MAX_CONFIG_BYTES = 1 << 20
MAX_REPORTED = 10


class SafetyError(Exception):
    """Changing the tree now is not safe; the message says what blocks and how to proceed."""


class LockHeldError(SafetyError):
    """Another regfsck run holds the root's lock."""


@dataclass(frozen=True, slots=True)
class _Identity:
    """A directory by device and inode: survives bind mounts and other mount namespaces."""

    dev: int
    ino: int


def _identity(path: str) -> _Identity | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return _Identity(st.st_dev, st.st_ino)


def _own_lineage(proc: Path) -> set[int]:
    """Our PID and our ancestors': the shell that started us is waiting, not using ROOT."""
    pids: set[int] = set()
    pid = os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            stat_line = (proc / str(pid) / "stat").read_text()
            pid = int(stat_line.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def _under(path: str, prefixes: tuple[str, ...]) -> bool:
    path = path.removesuffix(" (deleted)")
    return any(path == p or path.startswith(p + "/") for p in prefixes)


def _read_args(proc_dir: Path) -> list[str]:
    try:
        raw = (proc_dir / "cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode("utf-8", "replace") for a in raw.split(b"\0") if a]


def _describe(pid: int, args: list[str], proc_dir: Path) -> str:
    if args:
        shown = " ".join(args)
    else:
        try:
            shown = (proc_dir / "comm").read_text().strip()
        except OSError:
            shown = "?"
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return f"pid {pid} ({shown})"


def _read_environ(proc_dir: Path) -> dict[str, str] | None:
    try:
        raw = (proc_dir / "environ").read_bytes()
    except OSError:
        return None
    env: dict[str, str] = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            env[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
    return env


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


def _config_rootdir(text: str) -> tuple[bool, str | None]:
    """(uses the filesystem driver, its rootdirectory) from a registry config's text."""
    import yaml

    config = yaml.safe_load(text)
    storage = config.get("storage") if isinstance(config, dict) else None
    if not isinstance(storage, dict):
        return True, None
    drivers = [k for k in storage if k not in ("delete", "maintenance", "cache", "redirect", "tag")]
    if "filesystem" not in storage and drivers:
        return False, None
    fs = storage.get("filesystem")
    if isinstance(fs, dict) and fs.get("rootdirectory") is not None:
        return True, str(fs["rootdirectory"])
    return True, None


def _registry_target(pid: int, args: list[str], proc_dir: Path,
                     targets: set[_Identity]) -> str | None:
    """Why this registry process may serve ROOT, or None when it serves something else.

    Paths are looked up through /proc/PID/root and /proc/PID/cwd, so a registry in a
    container (another mount namespace) is resolved as it sees its own files."""
    env = _read_environ(proc_dir)
    if env is None:
        return "a registry process whose environment cannot be read (run regfsck as root to check it)"
    rootdir = env.get(ROOTDIR_ENV)
    config = _serve_config_arg(args) or env.get(CONFIG_ENV)
    source = f"environment {ROOTDIR_ENV}" if rootdir else f"config {config}"
    if not rootdir:
        if not config:
            return "a registry process without a config path regfsck can find"
        base = proc_dir / ("root" if config.startswith("/") else "cwd")
        config_path = f"{base}/{config.lstrip('/')}"
        import yaml  # only when a registry process is found: not at start-up

        try:
            with open(config_path, "rb") as handle:
                text = handle.read(MAX_CONFIG_BYTES).decode("utf-8", "replace")
            uses_fs, rootdir = _config_rootdir(text)
        except (OSError, yaml.YAMLError, AttributeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not valid YAML"
            return f"a registry process whose config {config} cannot be read ({reason})"
        if not uses_fs:
            return None
        rootdir = rootdir or DEFAULT_ROOTDIR
    seen_root = f"{proc_dir}/root/{rootdir.lstrip('/')}" if rootdir.startswith("/") else \
        f"{proc_dir}/cwd/{rootdir}"
    candidates = (_identity(seen_root), _identity(f"{seen_root}/docker/registry/v2"))
    if any(c is not None and c in targets for c in candidates):
        return f"a registry serving this root (rootdirectory {rootdir}, from {source})"
    return None


def _open_under(proc_dir: Path, prefixes: tuple[str, ...]) -> str | None:
    try:
        cwd = os.readlink(proc_dir / "cwd")
    except OSError:
        cwd = ""
    if cwd and _under(cwd, prefixes):
        return f"working directory {cwd}"
    try:
        fds = os.listdir(proc_dir / "fd")
    except OSError:
        return None
    for fd in fds:
        try:
            target = os.readlink(proc_dir / "fd" / fd)
        except OSError:
            continue
        if _under(target, prefixes):
            return f"has {target.removesuffix(' (deleted)')} open"
    return None


def registry_users(root: RegistryRoot, proc: Path = Path("/proc")) -> list[str]:
    """Human descriptions of processes that may be using ROOT (empty when none is seen)."""
    real_root = os.path.realpath(root.root)
    real_v2 = os.path.realpath(root.v2)
    prefixes = tuple(dict.fromkeys((real_root, real_v2, os.path.abspath(root.root))))
    targets = {i for i in (_identity(str(root.root)), _identity(str(root.v2))) if i is not None}
    ignored = _own_lineage(proc)
    users: list[str] = []
    try:
        pids = sorted(int(name) for name in os.listdir(proc) if name.isdigit())
    except OSError:
        return []
    for pid in pids:
        if pid in ignored:
            continue
        proc_dir = proc / str(pid)
        args = _read_args(proc_dir)
        reason = _open_under(proc_dir, prefixes)
        if reason is None and is_registry_serve(args):
            reason = _registry_target(pid, args, proc_dir, targets)
        if reason is not None:
            users.append(f"{_describe(pid, args, proc_dir)}: {reason}")
    return users


class RootLock:
    """Exclusive, non-blocking `flock` on ROOT/regfsck-state/lock for one mutating run.

    The kernel drops the lock when the process dies, so a crash never leaves it stuck."""

    def __init__(self, root: RegistryRoot) -> None:
        self.root = root
        self.storage = FilesystemStorage(root.root)
        self.path = f"{LOCK_DIR}/{LOCK_FILE}"
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
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

    def _holder(self) -> str:
        try:
            text = self.storage.read_small(self.path, 64).decode("ascii", "replace").strip()
        except StorageError:
            return "holder unknown"
        return f"pid {text}" if text.isdigit() else "holder unknown"

    def release(self) -> None:
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
    return (f"refusing to change {root.root}: it may be in use by {shown}{more}. "
            "Stop the registry (and any process working in the tree), then run again")


def check_unused(root: RegistryRoot) -> None:
    """Raise SafetyError when anything may be using ROOT (also used between sweep phases)."""
    users = registry_users(root)
    if users:
        raise SafetyError(users_message(root, users))


@contextmanager
def mutation_guard(root: RegistryRoot) -> Iterator[RootLock]:
    """Hold the root lock for a mutating command, refusing while anything may use ROOT.

    A refusal touches nothing (not even the lock file is created). When the process in
    the way is another regfsck holding the lock, the refusal says so."""
    users = registry_users(root)
    if users:
        RootLock(root).raise_if_held()
        raise SafetyError(users_message(root, users))
    with RootLock(root) as lock:
        check_unused(root)  # again, now that no other regfsck can start
        yield lock
