"""Finding the registry's data directory from a path or from its `config.yml`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from regfsck.layout import V2_PREFIX

DEFAULT_ROOT = Path("/var/lib/registry")
ROOTDIR_ENV = "REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY"


class RootError(Exception):
    """The given path or config does not lead to a registry tree (exit 3)."""


@dataclass(frozen=True)
class RegistryRoot:
    """The storage root (holding `docker/registry/v2`) and the `v2` directory itself."""

    root: Path
    v2: Path


def _refuse_symlinks(root: Path) -> None:
    """`docker`, `registry` and `v2` below ROOT must be real directories: following a link
    there would put every read, and every move of gc, outside ROOT."""
    level = root
    for part in V2_PREFIX.split("/"):
        level = level / part
        if level.is_symlink():
            raise RootError(f"{level} is a symbolic link, and regfsck never follows one inside ROOT; "
                            f"give the storage root that really holds {V2_PREFIX}")


def locate(path: Path) -> RegistryRoot:
    """Accept the storage root or the `v2` directory; anything else is a RootError."""
    path = Path(os.path.abspath(path))
    if path.is_symlink():
        raise RootError(f"{path} is a symbolic link; give the real directory")
    if not path.exists():
        raise RootError(f"{path} does not exist (expected a registry storage root "
                        f"holding {V2_PREFIX}/)")
    if not path.is_dir():
        raise RootError(f"{path} is not a directory (expected a registry storage root)")
    candidate = path / V2_PREFIX
    _refuse_symlinks(path)
    if candidate.is_dir():
        return RegistryRoot(path, candidate)
    is_v2 = path.name == "v2" and path.parent.name == "registry" and path.parent.parent.name == "docker"
    if is_v2 and ((path / "blobs").is_dir() or (path / "repositories").is_dir()):
        _refuse_symlinks(path.parent.parent.parent)
        return RegistryRoot(path.parent.parent.parent, path)
    raise RootError(
        f"{path} is not a registry root: expected {path / V2_PREFIX} "
        f"(a directory with blobs/ and repositories/)"
    )


def _storage_rootdir(config: dict[str, Any]) -> str | None:
    storage = config.get("storage")
    if not isinstance(storage, dict):
        return None
    fs = storage.get("filesystem")
    if fs is None:
        drivers = [k for k in storage if k not in ("delete", "maintenance", "cache", "redirect", "tag")]
        if drivers:
            raise RootError(f"storage driver is {drivers[0]!r}; regfsck reads only 'filesystem'")
        return None
    if isinstance(fs, dict):
        value = fs.get("rootdirectory")
        return str(value) if value is not None else None
    return None


def rootdir_from_config(config_path: Path, environ: dict[str, str] | None = None) -> Path:
    """The filesystem root directory a registry with this config (and environment) uses."""
    env = os.environ if environ is None else environ
    try:
        text = config_path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RootError(f"cannot read config {config_path}: {exc.strerror}") from exc
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RootError(f"config {config_path} is not valid YAML: {exc}") from exc
    if not isinstance(config, dict):
        raise RootError(f"config {config_path} is not a YAML mapping")
    override = env.get(ROOTDIR_ENV)
    if override:
        return Path(override)
    rootdir = _storage_rootdir(config)
    return Path(rootdir) if rootdir else DEFAULT_ROOT


def resolve(path: Path | None, config: Path | None) -> RegistryRoot:
    """Resolve the CLI's ROOT / --config pair into a registry tree."""
    if config is not None:
        if path is not None:
            raise RootError("give either ROOT or --config, not both")
        return locate(rootdir_from_config(config))
    return locate(path if path is not None else DEFAULT_ROOT)
