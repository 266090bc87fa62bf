"""The one place that knows the path layout of `docker/registry/v2`.

Every path here is relative to the `v2` directory and uses POSIX separators, so the
same strings serve the filesystem backend, findings and (later) object storage keys.
"""

from __future__ import annotations

V2_PREFIX = "docker/registry/v2"
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


def uploads_dir(repo: str) -> str:
    return join(REPOSITORIES, repo, UPLOADS_DIR)


def upload_dir(repo: str, upload_id: str) -> str:
    return join(uploads_dir(repo), upload_id)
