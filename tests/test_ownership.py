"""Writers keep the owner, group and modes of the tree they write into (issue 10, item 8).

The tree belongs to the registry's user (uid 999) and regfsck runs as root with umask 027,
as an operator's root shell may. Whatever repair and import create (restored blobs, their
new directories, rewritten `current/link`s, new repositories) must get the owner and group
of the directory it lands in and the modes of its neighbours; the real registry, started as
uid 999, must then serve every tag.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from regfsck import layout
from tests import realtools
from tests.realtools import SampleInfo
from tests.support import REPO_ROOT, V2
from tests.support.cli import run
from tests.support.served import Served

pytestmark = pytest.mark.realtools
UID = GID = 999


def as_root_with_umask(*args: str) -> subprocess.CompletedProcess[str]:
    """A process with umask 027: what regfsck creates must not take its modes from it."""
    return run(*args, env=realtools.clean_env(), cwd=REPO_ROOT, preexec_fn=lambda: os.umask(0o027))


def chown_tree(root: Path, uid: int, gid: int) -> None:
    for path in [root, *root.rglob("*")]:
        os.chown(path, uid, gid, follow_symlinks=False)


def strangers(root: Path) -> list[str]:
    """Entries of the registry's tree that are not the registry user's or not 0644/0755."""
    bad = []
    for path in [root / V2, *(root / V2).rglob("*")]:
        st = path.lstat()
        want = 0o755 if stat.S_ISDIR(st.st_mode) else 0o644
        if (st.st_uid, st.st_gid) != (UID, GID) or stat.S_IMODE(st.st_mode) != want:
            bad.append(f"{path.relative_to(root)} {st.st_uid}:{st.st_gid} {oct(st.st_mode)}")
    return bad


def serve_as_registry_user(root: Path, tmp_path: Path) -> Served:
    config_dir = root.parent / "config"  # where the registry's user can read it
    config_dir.mkdir(mode=0o755)
    port = realtools.free_port()
    config = realtools.write_registry_config(config_dir / "config.yml", root, port=port)
    os.chmod(config, 0o644)
    binary = shutil.which(realtools.REGISTRY_BIN) or realtools.REGISTRY_BIN
    return Served(["setpriv", "--reuid", str(UID), "--regid", str(GID), "--clear-groups", binary,
                   "serve", str(config)], port, realtools.clean_env(), config_dir)


def pull(served: Served, refs: list[str], dest: Path) -> None:
    dest.mkdir()
    for n, ref in enumerate(refs):
        realtools.skopeo_copy(f"docker://127.0.0.1:{served.port}/{ref}", f"dir:{dest / str(n)}",
                              "--all")


@pytest.fixture
def owned_root(sample_root: Path) -> Iterator[Path]:
    """A copy of the sample tree owned by the registry's user, in a directory that user can
    reach (pytest's own temp directories are root's 0700, and pytest re-tightens them)."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv(1) to play root writing into a registry user's tree")
    base = Path(tempfile.mkdtemp(prefix="regfsck-owned-"))
    try:
        os.chmod(base, 0o755)
        root = shutil.copytree(sample_root, base / "root", symlinks=True)
        chown_tree(root, UID, GID)
        assert strangers(root) == []
        yield root
    finally:
        shutil.rmtree(base)


def test_repair_as_root_writes_files_the_registry_user_can_read(
        owned_root: Path, sample_info: SampleInfo, tmp_path: Path) -> None:
    backup = shutil.copytree(owned_root, tmp_path / "backup", symlinks=True)
    repo, _, layer = sample_info.zstd
    shutil.rmtree(owned_root / V2 / layout.blob_dir(layer))  # restored from --from, new dirs
    if not any((owned_root / V2 / "blobs/sha256" / layer[7:9]).iterdir()):
        (owned_root / V2 / "blobs/sha256" / layer[7:9]).rmdir()
    tag_link = owned_root / V2 / layout.tag_current_link(repo, "latest")
    tag_link.write_bytes(b"garbage")  # rewritten from the tag's history
    result = as_root_with_umask("repair", str(owned_root), "--from", str(backup), "--apply")
    assert result.returncode == 0, result.stdout + result.stderr
    served = serve_as_registry_user(owned_root, tmp_path)
    try:
        pull(served, [f"{r}:{t}" for r, tags in sample_info.tags.items() for t in tags],
             tmp_path / "pulled")
    finally:
        served.stop()
    assert strangers(owned_root) == []


def test_import_as_root_into_a_new_repository(owned_root: Path, sample_info: SampleInfo,
                                              tmp_path: Path) -> None:
    archive = tmp_path / "export.tar"
    exported = as_root_with_umask("export", str(owned_root), "compress/zstd:latest", "-o",
                                  str(archive), "--format", "oci-archive")
    assert exported.returncode == 0, exported.stderr
    result = as_root_with_umask("import", str(owned_root), str(archive), "--repo", "fresh/ns/img",
                                "--apply")
    assert result.returncode == 0, result.stdout + result.stderr
    served = serve_as_registry_user(owned_root, tmp_path)
    try:
        pull(served, ["fresh/ns/img:latest", "compress/zstd:latest"], tmp_path / "pulled")
    finally:
        served.stop()
    assert strangers(owned_root) == []
