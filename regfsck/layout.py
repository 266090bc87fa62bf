"""The one place that knows the path layout of `docker/registry/v2`, both ways: what path
holds a thing (`blob_data`, `layer_link`, ...) and what a path is (`parse_path`, ...).

Every path here is relative to the `v2` directory and uses POSIX separators, so the
same strings serve the filesystem backend, findings and (later) object storage keys.
"""

from __future__ import annotations

from dataclasses import dataclass

from regfsck.digest import Digest

V2_PREFIX = "docker/registry/v2"

# regfsck's own directories beside `docker/` in the storage root (relative to ROOT, not to
# v2), where the registry never looks.
STATE_DIR = "regfsck-state"  # the root lock, the verification record, repair's spool
QUARANTINE_DIR = "regfsck-quarantine"  # journaled runs: what they moved away and created
OWN_DIRS = (STATE_DIR, QUARANTINE_DIR)
BLOBS = "blobs"
REPOSITORIES = "repositories"
LAYERS_DIR = "_layers"
MANIFESTS_DIR = "_manifests"
UPLOADS_DIR = "_uploads"
REVISIONS = "revisions"
TAGS = "tags"
LINK = "link"
DATA = "data"
STARTEDAT = "startedat"
HASHSTATES = "hashstates"
CURRENT = "current"
INDEX = "index"


def join(*parts: str) -> str:
    """Join path parts with `/`, skipping empty ones."""
    return "/".join(p for p in parts if p)


def split_digest(digest: str) -> tuple[str, str]:
    """Split a validated `alg:hex` digest; refuses anything that could escape a directory."""
    algorithm, _, hex_part = digest.partition(":")
    if not algorithm.isalnum() or not hex_part.isalnum():
        raise ValueError(f"not a digest usable in a path: {digest[:80]!r}")
    return algorithm, hex_part


def blob_dir(digest: str) -> str:
    algorithm, hex_part = split_digest(digest)
    return join(BLOBS, algorithm, hex_part[:2], hex_part)


def blob_data(digest: str) -> str:
    return join(blob_dir(digest), DATA)


def repo_dir(repo: str) -> str:
    return join(REPOSITORIES, repo)


def layer_link(repo: str, digest: str) -> str:
    return join(REPOSITORIES, repo, LAYERS_DIR, *split_digest(digest), LINK)


def revision_dir(repo: str, digest: str) -> str:
    return join(REPOSITORIES, repo, MANIFESTS_DIR, REVISIONS, *split_digest(digest))


def revision_link(repo: str, digest: str) -> str:
    return join(revision_dir(repo, digest), LINK)


def tags_dir(repo: str) -> str:
    return join(REPOSITORIES, repo, MANIFESTS_DIR, TAGS)


def tag_dir(repo: str, tag: str) -> str:
    return join(tags_dir(repo), tag)


def tag_current_link(repo: str, tag: str) -> str:
    return join(tag_dir(repo, tag), CURRENT, LINK)


def tag_index_dir(repo: str, tag: str, digest: str) -> str:
    return join(tag_dir(repo, tag), INDEX, *split_digest(digest))


def tag_index_link(repo: str, tag: str, digest: str) -> str:
    return join(tag_index_dir(repo, tag, digest), LINK)


def in_tag_history(path: str) -> bool:
    """Is `path` (any prefix) a tag's history or inside it, `.../_manifests/tags/<t>/index`?
    (No repository name component starts with "_": the pattern names nothing else.)"""
    parts = path.split("/")
    return any(part == MANIFESTS_DIR and parts[i + 1:i + 2] == [TAGS]
               and parts[i + 3:i + 4] == [INDEX] for i, part in enumerate(parts))


def uploads_dir(repo: str) -> str:
    return join(REPOSITORIES, repo, UPLOADS_DIR)


def upload_dir(repo: str, upload_id: str) -> str:
    return join(uploads_dir(repo), upload_id)


# --------------------------------------------------------------------------- path -> what it is


@dataclass(frozen=True, slots=True)
class LayoutPath:
    """What a v2-relative file path is in the layout."""

    kind: str  # "blob", "revision", "layer", "tag_current", "tag_index", "other"
    repo: str | None = None
    digest: Digest | None = None
    tag: str | None = None


_MANIFESTS = f"/{MANIFESTS_DIR}/"
_LAYERS = f"/{LAYERS_DIR}/"


def parse_path(rel: str) -> LayoutPath:
    """The role of a v2-relative file path: a blob's data, or a revision, layer, tag
    `current` or tag index link (with its repository, digest and tag); "other" for
    anything else. The digest is as the path spells it, not validated."""
    parts = rel.split("/")
    if parts[0] == BLOBS and len(parts) == 5 and parts[4] == DATA:
        return LayoutPath("blob", digest=Digest(f"{parts[1]}:{parts[3]}"))
    if parts[0] != REPOSITORIES or parts[-1] != LINK:
        return LayoutPath("other")
    body = "/" + "/".join(parts[1:])
    if _LAYERS in body:
        repo, _, rest = body.partition(_LAYERS)
        bits = rest.split("/")
        if len(bits) == 3:
            return LayoutPath("layer", repo[1:], Digest(f"{bits[0]}:{bits[1]}"))
        return LayoutPath("other")
    repo, _, rest = body.partition(_MANIFESTS)
    bits = rest.split("/")
    repo = repo[1:]
    if bits[0] == REVISIONS and len(bits) == 4:
        return LayoutPath("revision", repo, Digest(f"{bits[1]}:{bits[2]}"))
    if bits[0] == TAGS and len(bits) == 4 and bits[2] == CURRENT:
        return LayoutPath("tag_current", repo, tag=bits[1])
    if bits[0] == TAGS and len(bits) == 6 and bits[2] == INDEX:
        return LayoutPath("tag_index", repo, Digest(f"{bits[3]}:{bits[4]}"), bits[1])
    return LayoutPath("other")


def blob_dir_digest(path: str) -> Digest:
    """The digest a `blobs/<alg>/<xx>/<hex>` directory (see `blob_dir`) holds."""
    parts = path.split("/")
    return Digest(f"{parts[1]}:{parts[3]}")


def link_dir_owner(path: str) -> tuple[str, Digest]:
    """(repository, digest) of a `repositories/<repo>/_manifests/revisions/<alg>/<hex>` or
    `repositories/<repo>/_layers/<alg>/<hex>` directory (see `revision_dir`)."""
    repo_part, _, rest = path.partition(_MANIFESTS)
    if not rest:
        repo_part, _, rest = path.partition(_LAYERS)
    parts = rest.split("/")
    return repo_part.removeprefix(REPOSITORIES + "/"), Digest(f"{parts[-2]}:{parts[-1]}")
