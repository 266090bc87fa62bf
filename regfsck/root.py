"""Finding the registry's data directory from a path or from its `config.yml`."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from regfsck.errors import RegfsckError
from regfsck.layout import V2_PREFIX

DEFAULT_ROOT = Path("/var/lib/registry")
ROOTDIR_ENV = "REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY"


class RootError(RegfsckError):
    """The given path or config does not lead to a registry tree (exit 3)."""


@dataclass(frozen=True)
class S3Location:
    """Where a registry's `s3` storage driver keeps its tree, and how to reach it.

    `prefix` is the driver's `rootdirectory` without its leading and trailing slashes: the
    objects are `PREFIX/docker/registry/v2/...` (`docker/registry/v2/...` when empty).
    Fields left None come from the standard AWS environment and files."""

    bucket: str
    prefix: str = ""
    region: str | None = None
    endpoint: str | None = None
    access_key: str | None = None
    secret_key: str | None = None
    force_path_style: bool | None = None
    secure: bool = True
    # "s3", or "azure": the registry's `azure` driver, read through the same object-store
    # backend (bucket = container, access_key = accountname, secret_key = accountkey,
    # endpoint = serviceurl, the account's blob URL).
    provider: str = "s3"

    @property
    def url(self) -> str:
        scheme = self.provider
        return f"{scheme}://{self.bucket}/{self.prefix}" if self.prefix else f"{scheme}://{self.bucket}"

    @property
    def v2_prefix(self) -> str:
        """The key prefix of the `v2` tree, ending in `/`."""
        return f"{self.prefix}/{V2_PREFIX}/" if self.prefix else f"{V2_PREFIX}/"


# Local paths of an object-storage root: below /dev/null, so that any code path that still
# treats them as a directory fails (ENOTDIR) instead of creating files on the local disk.
_NO_LOCAL_DIR = Path("/dev/null/regfsck-object-storage")


@dataclass(frozen=True)
class RegistryRoot:
    """The storage root (holding `docker/registry/v2`) and the `v2` directory itself.

    For a tree in object storage, `s3` says where it is and `root`/`v2` are local paths
    that cannot exist (see `_NO_LOCAL_DIR`): every read goes through `storage.open_storage`."""

    root: Path
    v2: Path
    s3: S3Location | None = None
    # Object storage only: regfsck cannot see a registry's processes there, so before it
    # changes the tree it asks each of these registries (`safety.registry_url_state`) whether
    # it is down or read-only; `registry_check=False` is the operator's --no-registry-check.
    registry_urls: tuple[str, ...] = ()
    registry_check: bool = True
    break_lock: bool = False  # --break-lock: take over a stale object-storage lock

    @property
    def is_object_storage(self) -> bool:
        return self.s3 is not None

    @property
    def display(self) -> str:
        """ROOT as the operator gave it (a path or an s3:// URL)."""
        return self.s3.url if self.s3 is not None else str(self.root)


def object_root(location: S3Location) -> RegistryRoot:
    local = _NO_LOCAL_DIR / location.bucket / (location.prefix or "_")
    return RegistryRoot(local, local / V2_PREFIX, location)


def parse_s3_url(text: str) -> S3Location:
    """`s3://BUCKET/PREFIX` or `azure://CONTAINER/PREFIX` (PREFIX: the registry's
    rootdirectory, may be empty)."""
    provider = "azure" if text.startswith("azure:/") else "s3"
    scheme = f"{provider}:/"
    rest = text[len(scheme) + 1:] if text.startswith(scheme + "/") else text[len(scheme):]
    bucket, _, prefix = rest.partition("/")
    prefix = prefix.strip("/")
    if not bucket or "\x00" in text or any(p in (".", "..") for p in prefix.split("/") if p):
        raise RootError(f"{text!r} is not a usable {provider}://"
                        f"{'CONTAINER' if provider == 'azure' else 'BUCKET'}/PREFIX URL")
    return S3Location(bucket, "/".join(p for p in prefix.split("/") if p), provider=provider)


def is_s3_url(path: Path | str) -> bool:
    """ROOT names a bucket (`s3://`) or an Azure container (`azure://`). typer hands ROOT
    over as a Path, which folds `s3://` to `s3:/`."""
    text = str(path)
    return text.startswith(("s3:/", "azure:/"))


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


S3_ENV = "REGISTRY_STORAGE_S3_"
_NOT_DRIVERS = ("delete", "maintenance", "cache", "redirect", "tag")


def _env_bool(value: object, what: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise RootError(f"{what}: {value!r} is not a boolean")


def s3_location_from_config(section: object, env: Mapping[str, str]) -> S3Location:
    """The registry's `storage: s3:` parameters, with its REGISTRY_STORAGE_S3_* overrides."""
    params: dict[str, object] = {str(k).lower(): v for k, v in section.items()} \
        if isinstance(section, dict) else {}
    for key, value in env.items():
        if key.startswith(S3_ENV) and value != "":
            params[key[len(S3_ENV):].lower()] = value
    bucket = params.get("bucket")
    if not bucket:
        raise RootError("storage driver 's3' without a bucket")

    def text(name: str) -> str | None:
        value = params.get(name)
        return None if value is None or value == "" else str(value)

    rootdir = (text("rootdirectory") or "").strip("/")
    secure = _env_bool(params["secure"], "secure") if "secure" in params else True
    force = _env_bool(params["forcepathstyle"], "forcepathstyle") \
        if "forcepathstyle" in params else None
    endpoint = text("regionendpoint")
    if endpoint is not None and "://" not in endpoint:
        endpoint = f"{'https' if secure else 'http'}://{endpoint}"
    return S3Location(str(bucket), rootdir, region=text("region"), endpoint=endpoint,
                      access_key=text("accesskey"), secret_key=text("secretkey"),
                      force_path_style=force, secure=secure)


AZURE_ENV = "REGISTRY_STORAGE_AZURE_"


def azure_location_from_config(section: object, env: Mapping[str, str]) -> S3Location:
    """The registry's `storage: azure:` parameters (accountname, accountkey, container,
    serviceurl or realm, rootdirectory), with its REGISTRY_STORAGE_AZURE_* overrides.
    Without `serviceurl` the account's blob URL is `https://ACCOUNT.blob.REALM`
    (realm `core.windows.net`), as the driver builds it."""
    params: dict[str, object] = {str(k).lower(): v for k, v in section.items()} \
        if isinstance(section, dict) else {}
    for key, value in env.items():
        if key.startswith(AZURE_ENV) and value != "":
            params[key[len(AZURE_ENV):].lower()] = value

    def text(name: str) -> str | None:
        value = params.get(name)
        return None if value is None or value == "" else str(value)

    container = text("container")
    if not container:
        raise RootError("storage driver 'azure' without a container")
    account = text("accountname")
    endpoint = text("serviceurl")
    if endpoint is None and account is not None:
        endpoint = f"https://{account}.blob.{text('realm') or 'core.windows.net'}"
    return S3Location(container, (text("rootdirectory") or "").strip("/"), endpoint=endpoint,
                      access_key=account, secret_key=text("accountkey"), provider="azure")


def _storage_rootdir(config: dict[str, Any]) -> str | None:
    storage = config.get("storage")
    if not isinstance(storage, dict):
        return None
    fs = storage.get("filesystem")
    if fs is None:
        drivers = [k for k in storage if k not in _NOT_DRIVERS]
        if drivers:
            raise RootError(f"storage driver is {drivers[0]!r}; regfsck reads 'filesystem', "
                            "'s3' and 'azure'")
        return None
    if isinstance(fs, dict):
        value = fs.get("rootdirectory")
        return str(value) if value is not None else None
    return None


def _load_config(config_path: Path) -> dict[str, Any]:
    try:
        text = config_path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RootError(f"cannot read config {config_path}: {exc.strerror}") from exc
    import yaml  # only for --config: not at start-up

    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RootError(f"config {config_path} is not valid YAML: {exc}") from exc
    if not isinstance(config, dict):
        raise RootError(f"config {config_path} is not a YAML mapping")
    return config


def root_from_config(config_path: Path, environ: Mapping[str, str] | None = None) -> Path | S3Location:
    """Where a registry with this config (and environment) keeps its tree."""
    env = os.environ if environ is None else environ
    config = _load_config(config_path)
    storage = config.get("storage")
    if isinstance(storage, dict) and "filesystem" not in storage and "s3" in storage:
        return s3_location_from_config(storage.get("s3"), env)
    if isinstance(storage, dict) and "filesystem" not in storage and "azure" in storage:
        return azure_location_from_config(storage.get("azure"), env)
    return _rootdir(config, env)


def rootdir_from_config(config_path: Path, environ: Mapping[str, str] | None = None) -> Path:
    """The filesystem root directory a registry with this config (and environment) uses."""
    env = os.environ if environ is None else environ
    return _rootdir(_load_config(config_path), env)


def _rootdir(config: dict[str, Any], env: Mapping[str, str]) -> Path:
    override = env.get(ROOTDIR_ENV)
    if override:
        return Path(override)
    rootdir = _storage_rootdir(config)
    return Path(rootdir) if rootdir else DEFAULT_ROOT


def resolve(path: Path | None, config: Path | None) -> RegistryRoot:
    """Resolve the CLI's ROOT / --config pair into a registry tree (RootError, exit 3, with
    what was expected; an unreadable parent directory or an I/O error is one too)."""
    try:
        return _resolve(path, config)
    except OSError as exc:
        raise RootError(f"cannot read {path if path is not None else config}: "
                        f"{exc.strerror or exc}") from exc


def _resolve(path: Path | None, config: Path | None) -> RegistryRoot:
    if config is not None:
        if path is not None:
            raise RootError("give either ROOT or --config, not both")
        where = root_from_config(config)
        return object_root(where) if isinstance(where, S3Location) else locate(where)
    if path is not None and is_s3_url(path):
        return object_root(parse_s3_url(str(path)))
    return locate(path if path is not None else DEFAULT_ROOT)
