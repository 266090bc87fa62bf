"""Image references as operators type them: `repo:tag`, `repo@sha256:...` or just `repo`.

The same form names images inside the OCI layouts regfsck writes (the
`org.opencontainers.image.ref.name` annotation), so `skopeo copy oci:DIR:repo:tag` finds them
and `regfsck import` can put them back under the same repository and tag.

What a bare `repo` means depends on the command, so the caller says it (`parse_ref`'s
`bare`): every tag of the repository for `rm` and `export`, `repo:latest` for `inspect`
(one image, as docker reads a bare name).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from regfsck.digest import DigestError, is_digest_prefix, parse_digest
from regfsck.errors import UsageError
from regfsck.names import is_valid_tag, repo_name_problem

# What a name without tag or digest means: the whole repository, or `repo:latest`.
Bare = Literal["repository", "latest"]
ALGORITHMS = ("sha256:", "sha384:", "sha512:")


class RefError(UsageError, ValueError):
    """A REF that does not parse, or names nothing in the tree (a usage error, exit 2)."""


@dataclass(frozen=True, slots=True)
class ImageRef:
    """A repository, optionally narrowed to one tag or one manifest digest; or (`repo`
    None, from `parse_ref(..., digest_alone=True)`) a digest in whichever repository."""

    repo: str | None
    tag: str | None = None
    digest: str | None = None

    def __str__(self) -> str:
        if self.digest is not None:
            return f"{self.repo}@{self.digest}" if self.repo is not None else self.digest
        if self.tag is not None:
            return f"{self.repo}:{self.tag}"
        return self.repo or ""

    @property
    def is_whole_repo(self) -> bool:
        return self.tag is None and self.digest is None

    @property
    def repository(self) -> str:
        """The repository named (every REF names one but a digest alone)."""
        if self.repo is None:
            raise RefError(f"{self}: give the repository too (REPO@{self})")
        return self.repo


def split_ref(text: str) -> tuple[str, str | None, str | None]:
    """Split without validating: (repo, tag, digest); a `:` before the last `/` is a port."""
    name, at, digest = text.partition("@")
    slash = name.rfind("/")
    colon = name.rfind(":")
    tag: str | None = None
    if colon > slash:
        name, tag = name[:colon], name[colon + 1:]
    return name, tag, (digest if at else None)


def _is_digest_alone(text: str) -> bool:
    try:
        parse_digest(text)
        return True
    except DigestError:
        return text.startswith(ALGORITHMS) and is_digest_prefix(text)


def parse_ref(text: str, *, bare: Bare, digest_alone: bool = False) -> ImageRef:
    """Parse and validate `repo`, `repo:tag` or `repo@alg:hex` (not both tag and digest).

    `bare` says what `repo` alone means: "repository" (every tag of it) or "latest"
    (`repo:latest`). With `digest_alone`, `sha256:...` alone (or a prefix of one) is a
    digest in any repository, not repository `sha256` with a tag. The digest may be a
    prefix (`repo@sha256:6d7e7209`, `repo@6d7e7209`, as git takes them); whoever looks the
    REF up expands it (`digest.expand_digest`)."""
    if not text:
        raise RefError("empty REF")
    if digest_alone and _is_digest_alone(text):
        return ImageRef(None, None, text)
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
            raise RefError(f"bad digest in {text!r}: {exc}") from exc
    if tag is None and digest is None and bare == "latest":
        tag = "latest"
    return ImageRef(repo, tag, digest)
