"""The Dockerfile, built for real with buildah (vfs storage, chroot isolation) and smoke-tested
the way the README runs it: the registry's volume mounted at /var/lib/registry, `verify`.

No image can be pulled from a container registry here, so `python:3.12-slim` is replaced by
an equivalent base made on the spot: a minimal Debian bookworm (debootstrap, from Debian's
package mirror) with python3 and its venv module, passed as `--build-arg BASE=...`. Every
other step of the Dockerfile runs as written (pip fetches the dependencies from the package
index). podman cannot start containers in this sandbox (crun may not set RLIMIT_NOFILE), so
the image is run with `buildah run --isolation chroot`, with the ENTRYPOINT read from the
image's own config.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import REPO_ROOT

MIRROR = "http://deb.debian.org/debian"
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")

pytestmark = pytest.mark.skipif(
    not (shutil.which("buildah") and shutil.which("debootstrap")),
    reason="needs buildah and debootstrap (Debian packages; .ci/run installs them)")


class Buildah:
    """buildah with a private vfs store under the test's tmp dir (nothing left behind)."""

    def __init__(self, base: Path) -> None:
        self.flags = ["--root", str(base / "storage"), "--runroot", str(base / "run"),
                      "--storage-driver", "vfs"]

    def __call__(self, *args: str, timeout: int = 900,
                 check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(["buildah", *self.flags, *args], capture_output=True, text=True,
                                timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"buildah {' '.join(args)} failed ({result.returncode}):\n"
                                 f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Buildah, str]]:
    work = tmp_path_factory.mktemp("container")
    buildah = Buildah(work)
    rootfs = work / "rootfs"
    boot = subprocess.run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv",
                           "bookworm", str(rootfs), MIRROR], capture_output=True, text=True,
                          timeout=1200)
    if boot.returncode != 0:
        shutil.rmtree(rootfs, ignore_errors=True)
        pytest.skip(f"cannot make a base image: debootstrap from {MIRROR} failed: "
                    f"{(boot.stderr or boot.stdout).strip().splitlines()[-1:]}")
    tarball = work / "rootfs.tar"
    subprocess.run(["tar", "-C", str(rootfs), "-cf", str(tarball), "."], check=True)
    shutil.rmtree(rootfs)
    base = buildah("from", "scratch").stdout.strip()
    buildah("add", base, str(tarball), "/")
    buildah("commit", "--rm", base, "localhost/regfsck-test-base:bookworm")
    tarball.unlink()
    build = ["bud", "--isolation", "chroot", "--pull-never",
             "--build-arg", "BASE=localhost/regfsck-test-base:bookworm",
             "-t", "localhost/regfsck:test"]
    if HOST_CA.is_file():  # the package index may sit behind a proxy with its own CA
        build += ["-v", f"{HOST_CA.parent}:{HOST_CA.parent}:ro", "--build-arg", f"PIP_CERT={HOST_CA}"]
    buildah(*build, str(REPO_ROOT))
    try:
        yield buildah, "localhost/regfsck:test"
    finally:
        buildah("rm", "--all", check=False)
        buildah("rmi", "--all", "--force", check=False)
        shutil.rmtree(work / "storage", ignore_errors=True)


def _config(buildah: Buildah, image: str) -> dict[str, object]:
    info = json.loads(buildah("inspect", "--type", "image", image).stdout)
    config: dict[str, object] = info["OCIv1"]["config"]
    return config


def _run(buildah: Buildah, image: str, volume: Path, *args: str,
         user: str | None = None) -> subprocess.CompletedProcess[str]:
    """`docker run --rm -v VOLUME:/var/lib/registry IMAGE ARGS...`, with buildah."""
    entrypoint = _config(buildah, image)["Entrypoint"]
    assert isinstance(entrypoint, list)
    ctr = buildah("from", "--pull-never", image).stdout.strip()
    try:
        return buildah("run", "--isolation", "chroot", "-v", f"{volume}:/var/lib/registry",
                       *(["--user", user] if user else []), ctr, "--", *entrypoint, *args,
                       check=False)
    finally:
        buildah("rm", ctr, check=False)


def test_image_config(image: tuple[Buildah, str]) -> None:
    config = _config(*image)
    assert config["Entrypoint"] == ["regfsck"]
    assert config.get("User") in ("root", "", None)  # like registry:2, whose files are root's
    assert "/var/lib/registry" in config.get("Volumes", {})  # type: ignore[operator]


def test_verify_the_registry_volume(image: tuple[Buildah, str], fixture_root: Path) -> None:
    result = _run(*image, fixture_root, "verify", "/var/lib/registry")
    assert result.returncode == 0, result.stderr
    stored = sum(1 for _ in (fixture_root / "docker/registry/v2/blobs").glob("*/*/*/data"))
    assert "0 errors" in result.stdout, result.stdout
    assert f"{stored} blobs re-hashed" in result.stdout, result.stdout


def test_damage_is_seen_from_the_container(image: tuple[Buildah, str], fixture_root: Path) -> None:
    victim = max((fixture_root / "docker/registry/v2/blobs").rglob("data"),
                 key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # (a layer's last bytes are tar padding: zeros already)
    victim.write_bytes(bytes(data))
    result = _run(*image, fixture_root, "verify", "/var/lib/registry", "--json")
    assert result.returncode == 1, result.stderr
    kinds = {f["kind"] for f in json.loads(result.stdout)["findings"]}
    assert "blob_digest_mismatch" in kinds


def test_unprivileged_user(image: tuple[Buildah, str], fixture_root: Path) -> None:
    """The non-root option: the image's `regfsck` user (uid 10001) reads a root-owned tree."""
    ident = _run(*image, fixture_root, "--version", user="regfsck")
    assert ident.returncode == 0 and ident.stdout.startswith("regfsck "), ident.stderr
    result = _run(*image, fixture_root, "verify", "/var/lib/registry", "--no-data", user="regfsck")
    assert result.returncode == 0, result.stderr
