"""A registry is recognised by what it can reach, not by its name (issue 10, item 3).

Real registries (Debian's 2.8.2 and v3.1.1) under other names serve a copy of the sample tree
with no file open; `gc --apply` must refuse (exit 3) and leave the tree as it was. Processes in
another mount namespace (a container's view: ROOT bind-mounted elsewhere) count too. And an
ordinary machine, with nothing using the tree, must not be refused.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from regfsck.root import locate
from regfsck.safety import registry_users
from tests import realtools
from tests.support import REPO_ROOT
from tests.support.cli import run
from tests.support.served import Served
from tests.support.snapshot import snapshot

pytestmark = pytest.mark.realtools
SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]  # takes any arguments


def registry3_binary(dest: Path) -> Path | None:
    """The real v3.1.1 binary unpacked to `dest`, or None when this machine has no copy."""
    for base in (os.environ.get("REGFSCK_SHARED_BIN"), REPO_ROOT.parent / "shared/bin",
                 REPO_ROOT.parent.parent / "shared/bin", Path("/work/shared/bin")):
        if base is None:
            continue
        script = Path(base) / "unpack-registry3"
        if script.is_file():
            result = subprocess.run([str(script), str(dest)], capture_output=True, text=True)
            if result.returncode == 0:
                return dest
    return None


@pytest.fixture(scope="module")
def binaries(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The real registries, each copied under a name no name list would know."""
    missing = realtools.real_tools_missing()
    if missing:
        pytest.skip(f"real registry tools unavailable: {missing}")
    where = tmp_path_factory.mktemp("bin")
    found = {"2.8": where / "registry_DO_NOT_USE_GC"}
    shutil.copy2(shutil.which(realtools.REGISTRY_BIN) or "", found["2.8"])
    v3 = registry3_binary(where / "unpack")
    if v3 is not None:
        found["3"] = where / f"srv-{os.urandom(4).hex()}"
        os.rename(v3, found["3"])
    return found


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """In a process of its own: the safety checks look at the processes around it."""
    return run(*args, env=realtools.clean_env(), cwd=REPO_ROOT)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[object]:
    started: list[Served] = []

    def start(binary: Path, config_root: Path, *, env: dict[str, str] | None = None,
              prefix: list[str] | None = None, v3: bool = False) -> Served:
        port = realtools.free_port()
        config = tmp_path / f"config-{port}.yml"
        realtools.write_registry_config(config, config_root, port=port, schema1=not v3)
        served = Served([*(prefix or []), str(binary), "serve", str(config)], port,
                        {**realtools.clean_env(), **(env or {})}, tmp_path)
        started.append(served)
        return served

    yield start
    for served in started:
        served.stop()


def assert_gc_refused(root: Path) -> None:
    before = snapshot(root)
    result = cli("gc", str(root), "--apply", "--grace", "0", "--uploads-older-than", "0")
    assert result.returncode == 3, result.stdout + result.stderr
    assert "refusing to change" in result.stderr
    assert snapshot(root) == before


def assert_gc_has_work(root: Path) -> None:
    """Without the registry the same command would change the tree (the refusal is real)."""
    plan = cli("gc", str(root), "--grace", "0", "--uploads-older-than", "0", "--json")
    assert plan.returncode == 0, plan.stderr
    assert json.loads(plan.stdout)["blobs"], plan.stdout


@pytest.mark.parametrize("version", ["2.8", "3"])
def test_renamed_registry_serving_root_from_its_config(
        sample_root: Path, binaries: dict[str, Path], serve: object, version: str) -> None:
    if version not in binaries:
        pytest.skip("registry v3.1.1 binary not available (../shared/bin/unpack-registry3)")
    assert_gc_has_work(sample_root)
    served = serve(binaries[version], sample_root, v3=version == "3")  # type: ignore[operator]
    assert_gc_refused(sample_root)
    users = registry_users(locate(sample_root))
    assert any(f"pid {served.proc.pid} " in u and "registry serving this root" in u for u in users), users


@pytest.mark.parametrize("version", ["2.8", "3"])
def test_renamed_registry_serving_root_from_its_environment(
        sample_root: Path, binaries: dict[str, Path], serve: object, version: str,
        tmp_path: Path) -> None:
    if version not in binaries:
        pytest.skip("registry v3.1.1 binary not available (../shared/bin/unpack-registry3)")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    served = serve(binaries[version], elsewhere, v3=version == "3",  # type: ignore[operator]
                   env={"REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY": str(sample_root)})
    assert_gc_refused(sample_root)
    users = registry_users(locate(sample_root))
    assert any(f"pid {served.proc.pid} " in u and "REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY" in u
               for u in users), users


def unshare_prefix(mountpoint: Path, source: Path) -> list[str]:
    """A command prefix running the rest in a new mount namespace with `source` bind-mounted
    at `mountpoint` (what `docker run -v source:mountpoint` gives a container)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) to make a mount namespace")
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a mount namespace here: {probe.stderr.decode(errors='replace')}")
    script = 'mount --bind "$1" "$2" && shift 2 && exec "$@"'
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", str(source),
            str(mountpoint)]


def test_registry_in_another_mount_namespace(sample_root: Path, binaries: dict[str, Path],
                                             serve: object, tmp_path: Path) -> None:
    """The container case: the registry stores in its own /var/lib/registry, a bind mount of
    ROOT that does not exist in our namespace (here it is an empty directory)."""
    inside = tmp_path / "var-lib-registry"
    inside.mkdir()
    served = serve(binaries["2.8"], inside, prefix=unshare_prefix(inside, sample_root))  # type: ignore[operator]
    assert_gc_refused(sample_root)
    users = registry_users(locate(sample_root))
    assert any(f"pid {served.proc.pid} " in u and "mount namespace" in u for u in users), users


def test_idle_process_with_root_mounted_in_its_namespace(sample_root: Path, tmp_path: Path) -> None:
    inside = tmp_path / "mnt"
    inside.mkdir()
    proc = subprocess.Popen([*unshare_prefix(inside, sample_root), "sleep", "600"], cwd=tmp_path,
                            stdin=subprocess.DEVNULL)
    try:
        time.sleep(0.5)  # the mount is made before `sleep` starts
        assert_gc_refused(sample_root)
        assert [u for u in registry_users(locate(sample_root)) if f"pid {proc.pid} " in u]
    finally:
        proc.kill()
        proc.wait(10)


def test_other_namespaces_and_paths_elsewhere_are_not_users(sample_root: Path, tmp_path: Path) -> None:
    """No false alarms: a container that mounts another directory, a process whose arguments
    and environment name paths outside ROOT, and the machine as it is."""
    other = tmp_path / "other"
    other.mkdir()
    inside = tmp_path / "mnt"
    inside.mkdir()
    procs = [subprocess.Popen([*unshare_prefix(inside, other), "sleep", "600"], cwd=tmp_path),
             subprocess.Popen([*SLEEPER, str(tmp_path), str(other)], cwd=other,
                              env={**realtools.clean_env(), "DATA": str(other)})]
    try:
        time.sleep(0.5)
        assert registry_users(locate(sample_root)) == []
        assert_gc_has_work(sample_root)
        result = cli("gc", str(sample_root), "--apply", "--grace", "0")
        assert result.returncode == 0, result.stderr
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(10)


def test_paths_into_root_in_arguments_and_environment(sample_root: Path, tmp_path: Path) -> None:
    """`rsync /srv/registry ...`-like arguments and DATA=/srv/registry environments are users,
    whatever the process is called, and even when the path is reached through a symlink."""
    link = tmp_path / "via-link"
    link.symlink_to(sample_root / "docker")
    procs = [subprocess.Popen([*SLEEPER, f"{link}/registry/v2/blobs"], cwd=tmp_path),
             subprocess.Popen(["sleep", "601"], cwd=tmp_path,
                              env={**realtools.clean_env(), "BACKUP_SOURCE": str(sample_root)})]
    try:
        time.sleep(0.3)
        users = registry_users(locate(sample_root))
        assert any(f"pid {procs[0].pid} " in u and "argument" in u for u in users), users
        assert any(f"pid {procs[1].pid} " in u and "BACKUP_SOURCE" in u for u in users), users
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(10)


def test_unprivileged_run_on_an_ordinary_machine_is_not_refused(tmp_path: Path) -> None:
    """As a user who cannot look into root's processes, regfsck does not refuse for them."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv(1) to run as another user")
    base = Path(tempfile.mkdtemp(prefix="regfsck-unpriv-"))
    # The package as that user can read it: the checkout may sit in a directory only root
    # may enter (a clone in `mktemp -d`, mode 0700).
    code_dir = Path(tempfile.mkdtemp(prefix="regfsck-unpriv-code-"))
    try:
        os.chmod(base, 0o755)
        os.chmod(code_dir, 0o755)
        shutil.copytree(REPO_ROOT / "regfsck", code_dir / "regfsck",
                        ignore=shutil.ignore_patterns("__pycache__"))
        (base / "docker/registry/v2/blobs").mkdir(parents=True)
        for path in [base, *base.rglob("*")]:
            os.chown(path, 65534, 65534)
        code = ("import sys; from pathlib import Path; from regfsck.root import locate;"
                "from regfsck.safety import registry_users; print(registry_users(locate(Path(sys.argv[1]))))")
        result = subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
                                 sys.executable, "-c", code, str(base)], capture_output=True, text=True,
                                env={**realtools.clean_env(), "PYTHONPATH": str(code_dir)}, cwd="/")
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "[]"
    finally:
        shutil.rmtree(base)
        shutil.rmtree(code_dir)


def test_inherited_mount_of_a_dedicated_filesystem_is_not_use(sample_root: Path, tmp_path: Path) -> None:
    """ROOT on a filesystem of its own (here: a bind mount of itself), and a process with a
    private mount namespace that merely inherited that mount at the same place (systemd's
    PrivateTmp services): not a user, unless it works in ROOT like any process would."""
    prefix = unshare_prefix(tmp_path, tmp_path)  # skips without root or unshare
    subprocess.run(["mount", "--bind", str(sample_root), str(sample_root)], check=True)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        private = ["unshare", "-m", "--propagation", "private"]
        procs.append(subprocess.Popen([*private, *SLEEPER], cwd=tmp_path))
        procs.append(subprocess.Popen([*private, *SLEEPER, "inside"], cwd=sample_root / "docker"))
        time.sleep(0.5)
        users = registry_users(locate(sample_root))
        assert not [u for u in users if f"pid {procs[0].pid} " in u], users
        assert [u for u in users if f"pid {procs[1].pid} " in u and "working directory" in u], users
        assert prefix
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(10)
        subprocess.run(["umount", str(sample_root)], check=True)
