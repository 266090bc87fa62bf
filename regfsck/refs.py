"""Image references as operators type them: `repo:tag`, `repo@sha256:...` or just `repo`.

The same form names images inside the OCI layouts regfsck writes (the
`org.opencontainers.image.ref.name` annotation), so `skopeo copy oci:DIR:repo:tag` finds them
and `regfsck import` can put them back under the same repository and tag.
"""

from __future__ import annotations

from dataclasses import dataclass

from regfsck.digest import DigestError, is_digest_prefix, parse_digest
from regfsck.names import is_valid_tag, repo_name_problem


class RefError(ValueError):
    """Text that is not a usable image reference."""


@dataclass(frozen=True, slots=True)
class ImageRef:
    """A repository, optionally narrowed to one tag or one manifest digest."""

    repo: str
    tag: str | None = None
    digest: str | None = None

    def __str__(self) -> str:
        if self.digest is not None:
            return f"{self.repo}@{self.digest}"
        if self.tag is not None:
            return f"{self.repo}:{self.tag}"
        return self.repo

    @property
    def is_whole_repo(self) -> bool:
        return self.tag is None and self.digest is None


def split_ref(text: str) -> tuple[str, str | None, str | None]:
    """Split without validating: (repo, tag, digest); a `:` before the last `/` is a port."""
    name, at, digest = text.partition("@")
    slash = name.rfind("/")
    colon = name.rfind(":")
    tag: str | None = None
    if colon > slash:
        name, tag = name[:colon], name[colon + 1:]
    return name, tag, (digest if at else None)


def parse_ref(text: str) -> ImageRef:
    """Parse and validate `repo`, `repo:tag` or `repo@alg:hex` (not both tag and digest).

    The digest may be a prefix (`repo@sha256:6d7e7209`, `repo@6d7e7209`, as git takes
    them); whoever looks the REF up expands it (`digest.expand_digest`)."""
    repo, tag, digest = split_ref(text)
    if tag is not None and digest is not None:
        raise RefError(f"{text!r}: give a tag or a digest, not both")
    problem = repo_name_problem(repo)
    if problem:
        raise RefError(f"{text!r}: {problem}")
    if tag is not None and not is_valid_tag(tag):
        raise RefError(f"{text!r}: invalid tag {tag!r}")
    if digest is not None and not is_digest_prefix(digest):
        try:
            parse_digest(digest)
        except DigestError as exc:
            raise RefError(f"{text!r}: {exc}") from exc
    return ImageRef(repo, tag, digest)
