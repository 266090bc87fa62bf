"""Who may be using ROOT, and the lock: each refusal the issue asks for has a test here."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from regfsck.root import RegistryRoot, locate
from regfsck.safety import (
    LockHeldError,
    RootLock,
    SafetyError,
    is_registry_serve,
    mutation_guard,
    registry_users,
)
from tests import realtools
from tests.support import REPO_ROOT


def make_root(path: Path) -> RegistryRoot:
    (path / "docker/registry/v2/blobs").mkdir(parents=True)
    (path / "docker/registry/v2/repositories").mkdir()
    return locate(path)


@pytest.fixture
def root(tmp_path: Path) -> RegistryRoot:
    return make_root(tmp_path / "root")


def wait_for(predicate: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached")


@pytest.fixture
def spawn() -> Iterator[object]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(args: list[str], **kw: object) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, **kw)  # type: ignore[call-overload]
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait(10)


def mine(users: list[str], proc: subprocess.Popen[bytes]) -> list[str]:
    """The users that are `proc`: "pid N (command): why", or "pid N: why" for one that
    could not be seen into."""
    return [u for u in users if u.startswith((f"pid {proc.pid} ", f"pid {proc.pid}:"))]


def test_idle_tree_has_no_users(root: RegistryRoot) -> None:
    assert registry_users(root) == []


def _unreadable(monkeypatch: pytest.MonkeyPatch, path: str, times: int | None) -> list[str]:
    """/proc's `path` answers EACCES (as it does, even to root, to a process in the middle
    of an exec) the first `times` reads (None: always); the reads made, in order."""
    from regfsck import safety
    real = safety._read_bytes
    reads: list[str] = []

    def read(at: Path | str) -> bytes:
        reads.append(str(at))
        if str(at) == path and (times is None or reads.count(path) <= times):
            raise PermissionError(13, "Permission denied", str(at))
        return real(at)

    monkeypatch.setattr(safety, "_read_bytes", read)
    return reads


def test_a_process_unreadable_for_a_moment_is_looked_at_again(
        root: RegistryRoot, spawn: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """Seen into at the second look, it is judged as any other (here: not a user); a CI run
    once refused an undo for a process that was unreadable for an instant."""
    proc = spawn(["sleep", "60"])  # type: ignore[operator]
    wait_for(lambda: Path(f"/proc/{proc.pid}/cmdline").read_bytes())
    cmdline = f"/proc/{proc.pid}/cmdline"
    reads = _unreadable(monkeypatch, cmdline, times=1)
    assert mine(registry_users(root), proc) == []
    assert reads.count(cmdline) == 2


def test_a_process_that_stays_unreadable_counts_as_a_user(
        root: RegistryRoot, spawn: object, monkeypatch: pytest.MonkeyPatch) -> None:
    proc = spawn(["sleep", "60"])  # type: ignore[operator]
    wait_for(lambda: Path(f"/proc/{proc.pid}/cmdline").read_bytes())
    _unreadable(monkeypatch, f"/proc/{proc.pid}/cmdline", times=None)
    [user] = mine(registry_users(root), proc)
    assert "cannot be inspected" in user


def test_process_with_cwd_under_root(root: RegistryRoot, spawn: object) -> None:
    proc = spawn(["sleep", "60"], cwd=root.v2 / "blobs")  # type: ignore[operator]
    wait_for(lambda: mine(registry_users(root), proc))
    [user] = mine(registry_users(root), proc)
    assert "working directory" in user and "sleep" in user


def test_process_with_open_file_under_root(root: RegistryRoot, spawn: object, tmp_path: Path) -> None:
    data = root.v2 / "blobs" / "held-open"
    data.write_bytes(b"x")
    code = f"f = open({str(data)!r}, 'rb'); import time; time.sleep(60)"
    proc = spawn([sys.executable, "-c", code], cwd=tmp_path)  # type: ignore[operator]
    wait_for(lambda: mine(registry_users(root), proc))
    [user] = mine(registry_users(root), proc)
    assert "held-open open" in user


def test_a_descriptor_argument_is_the_process_own_not_ours(root: RegistryRoot, spawn: object,
                                                           tmp_path: Path) -> None:
    """`/dev/fd/N` or `/proc/self/fd/N` in a command line (bash runs scripts so) names the
    process's descriptor N: while we hold N open in the tree (the root lock, the tree the
    run changes) it is not a path into ROOT for that process, unless its own N is."""
    held = os.open(root.root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        stranger = spawn([sys.executable, "-c", "import time; time.sleep(60)",  # type: ignore[operator]
                          f"/dev/fd/{held}", f"/proc/self/fd/{held}"], cwd=tmp_path)
        inside = spawn([sys.executable, "-c", "import time; time.sleep(60)",  # type: ignore[operator]
                        f"/dev/fd/{held}"], cwd=tmp_path, pass_fds=(held,))
        wait_for(lambda: mine(registry_users(root), inside))
        assert mine(registry_users(root), stranger) == []
    finally:
        os.close(held)


def test_other_roots_are_not_users(root: RegistryRoot, spawn: object, tmp_path: Path) -> None:
    other = make_root(tmp_path / "other")
    proc = spawn(["sleep", "60"], cwd=other.v2)  # type: ignore[operator]
    wait_for(lambda: mine(registry_users(other), proc))
    assert mine(registry_users(root), proc) == []


def test_registry_command_lines() -> None:
    assert is_registry_serve(["/usr/bin/docker-registry", "serve", "/etc/docker/registry/config.yml"])
    assert is_registry_serve(["registry", "serve", "config.yml"])
    assert not is_registry_serve(["docker-registry", "garbage-collect", "config.yml"])
    assert not is_registry_serve(["vim", "serve"])
    assert not is_registry_serve([])


def fake_registry(spawn: object, args: list[str], env: dict[str, str], cwd: Path,
                  **kw: object) -> subprocess.Popen[bytes]:
    """A process whose command line is `registry serve ...` and that holds no file open."""
    return spawn(["registry", "-c", "import time; time.sleep(60)", *args],  # type: ignore[operator]
                 executable=sys.executable, env=env, cwd=cwd, **kw)


def test_idle_registry_found_by_its_config(root: RegistryRoot, spawn: object, tmp_path: Path) -> None:
    config = tmp_path / "config.yml"
    config.write_text(f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {root.root}\n")
    env = realtools.clean_env()
    proc = fake_registry(spawn, ["serve", "config.yml"], env, tmp_path)  # relative to its cwd
    wait_for(lambda: mine(registry_users(root), proc))
    [user] = mine(registry_users(root), proc)
    assert "registry serving this root" in user and "config.yml" in user


def test_registry_found_by_config_env_and_rootdir_env(root: RegistryRoot, spawn: object,
                                                      tmp_path: Path) -> None:
    elsewhere = make_root(tmp_path / "elsewhere")
    config = tmp_path / "config.yml"
    config.write_text(f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {elsewhere.root}\n")
    by_path_env = fake_registry(spawn, ["serve"], {**realtools.clean_env(),
                                                   "REGISTRY_CONFIGURATION_PATH": str(config)}, tmp_path)
    overridden = fake_registry(spawn, ["serve", str(config)], {
        **realtools.clean_env(), "REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY": str(root.root)}, tmp_path)
    wait_for(lambda: mine(registry_users(root), overridden) and mine(registry_users(elsewhere), by_path_env))
    assert mine(registry_users(root), by_path_env) == []  # its config points elsewhere
    assert mine(registry_users(elsewhere), overridden) == []  # the environment wins
    [user] = mine(registry_users(root), overridden)
    assert "REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY" in user


def test_registry_with_another_driver_is_not_a_user(root: RegistryRoot, spawn: object,
                                                    tmp_path: Path) -> None:
    config = tmp_path / "config.yml"
    config.write_text("version: 0.1\nstorage:\n  s3:\n    bucket: b\n")
    proc = fake_registry(spawn, ["serve", str(config)], realtools.clean_env(), tmp_path)
    time.sleep(0.3)
    assert mine(registry_users(root), proc) == []


def test_unreadable_registry_config_counts_as_a_user(root: RegistryRoot, spawn: object,
                                                     tmp_path: Path) -> None:
    proc = fake_registry(spawn, ["serve", str(tmp_path / "missing.yml")], realtools.clean_env(), tmp_path)
    wait_for(lambda: mine(registry_users(root), proc))
    assert "missing.yml is not readable" in mine(registry_users(root), proc)[0]


def test_registry_serving_a_config_from_a_pipe_counts_as_a_user(root: RegistryRoot, spawn: object,
                                                                tmp_path: Path) -> None:
    """`registry serve <(...)` (its config on /dev/fd/N, a pipe): the pipe is its own, and
    not ours to read from; what it configures cannot be known, so it counts as a user."""
    read_end, write_end = os.pipe()
    try:
        proc = fake_registry(spawn, ["serve", f"/dev/fd/{read_end}"], realtools.clean_env(),
                             tmp_path, pass_fds=(read_end,))
        wait_for(lambda: mine(registry_users(root), proc))
        assert f"/dev/fd/{read_end}" in mine(registry_users(root), proc)[0]
    finally:
        os.close(read_end)
        os.close(write_end)


@pytest.mark.realtools
def test_real_idle_registry_is_found(root: RegistryRoot,
                                     running_registry: type[realtools.RealRegistry]) -> None:
    with running_registry(root.root) as reg:
        assert reg.request("GET", "/v2/").status == 200
        users = registry_users(root)
        assert any("docker-registry serve" in u and "registry serving this root" in u for u in users)
        with pytest.raises(SafetyError, match="Stop the registry"), mutation_guard(root):
            pytest.fail("mutation_guard let a change through while the registry runs")
    assert registry_users(root) == []
    with mutation_guard(root) as lock:
        assert lock.held


def test_lock_is_exclusive_and_released(root: RegistryRoot) -> None:
    with RootLock(root) as first:
        assert first.held
        with pytest.raises(LockHeldError, match=f"pid {os.getpid()}"), RootLock(root):
            pass
        assert registry_users(root) == []  # our own lock file is not a user
    with RootLock(root):
        pass


def test_lock_held_by_another_process(root: RegistryRoot, tmp_path: Path) -> None:
    code = ("import sys, time; from regfsck.root import locate; from regfsck.safety import RootLock;"
            "lock = RootLock(locate(sys.argv[1])); lock.acquire(); print('locked', flush=True);"
            "time.sleep(60)")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", code, str(root.root)], stdout=subprocess.PIPE,
                            env=env, cwd=tmp_path)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"locked"
        with pytest.raises(LockHeldError, match=f"pid {proc.pid}"), mutation_guard(root):
            pass
    finally:
        proc.kill()
        proc.wait(10)
    with mutation_guard(root):  # the kernel released the dead holder's lock
        pass


def test_guard_refuses_while_a_process_works_in_the_tree(root: RegistryRoot, spawn: object) -> None:
    proc = spawn(["sleep", "60"], cwd=root.v2)  # type: ignore[operator]
    wait_for(lambda: mine(registry_users(root), proc))
    with pytest.raises(SafetyError, match=f"pid {proc.pid}"), mutation_guard(root):
        pass
    # The refusal released the lock again.
    with RootLock(root):
        pass
