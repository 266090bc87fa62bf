"""Findings: the plain-data result of every check, and the catalogue of their kinds.

Each kind has a stable id (scripts match on it), a default severity and one line of
documentation; the README's table is generated from `CATALOG` (see `regfsck kinds`).
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any

from regfsck.layout import V2_PREFIX


class Severity(enum.StrEnum):
    ERROR = "error"
    WARNING = "warning"
    INFO = "info"


@dataclass(frozen=True)
class KindInfo:
    severity: Severity
    summary: str


E, W, N = Severity.ERROR, Severity.WARNING, Severity.INFO

CATALOG: dict[str, KindInfo] = {
    # blobs
    "blob_digest_mismatch": KindInfo(E, "blob data does not hash to its name (re-hashed twice)"),
    "blob_empty": KindInfo(E, "zero-byte blob data under a digest other than the empty one"),
    "blob_size_mismatch": KindInfo(E, "blob size differs from a descriptor that references it"),
    "blob_missing_data": KindInfo(E, "blob directory without a data file"),
    "blob_data_not_file": KindInfo(E, "blob data is a directory or special file"),
    "blob_wrong_fanout": KindInfo(E, "blob stored under the wrong two-character fan-out dir"),
    "blob_bad_name": KindInfo(E, "blob path component is not a valid algorithm/hex name"),
    "blob_unreadable": KindInfo(E, "blob data could not be read"),
    # links
    "link_invalid": KindInfo(E, "link content is not exactly a digest (empty, newline, junk)"),
    "link_mismatch": KindInfo(E, "revision or tag-index link content differs from its path"),
    "link_not_file": KindInfo(E, "a link is a directory or special file"),
    "link_bad_path": KindInfo(E, "link directory is not a valid algorithm/hex name"),
    "link_alias": KindInfo(N, "_layers alias link (content differs from the path by design)"),
    "missing_link": KindInfo(W, "a link directory holds no link file but other entries"),
    "layer_link_dangling": KindInfo(W, "_layers link to a blob that does not exist"),
    "revision_blob_missing": KindInfo(E, "revision link to a manifest blob that does not exist"),
    "revision_not_manifest": KindInfo(E, "revision's blob is not a usable manifest"),
    # tags
    "tag_bad_name": KindInfo(E, "tag directory name breaks the tag grammar"),
    "tag_no_current": KindInfo(W, "tag directory without current/link (listed, unresolvable)"),
    "tag_revision_missing": KindInfo(E, "tag points at a digest with no revision link"),
    "tag_blob_missing": KindInfo(E, "tag points at a digest whose blob is missing"),
    "tag_index_orphan": KindInfo(N, "tag history entry whose revision is gone"),
    "tag_index_missing_current": KindInfo(W, "tag's current digest is absent from its history"),
    # manifests
    "manifest_invalid_json": KindInfo(E, "manifest blob is not a JSON object"),
    "manifest_unknown_type": KindInfo(E, "unknown schemaVersion or mediaType"),
    "manifest_too_large": KindInfo(E, "manifest over the registry's 4 MiB limit"),
    "manifest_too_deep": KindInfo(E, "manifest JSON nested deeper than regfsck's bound"),
    "manifest_bad_descriptor": KindInfo(E, "a descriptor without a valid digest or size"),
    "manifest_schema1": KindInfo(W, "schema1 manifest: readable by 2.8, refused by 3.x"),
    "manifest_cycle": KindInfo(E, "index/list references itself through its children"),
    "reference_missing": KindInfo(E, "config, layer or child blob does not exist"),
    "reference_not_linked": KindInfo(E, "config/layer exists but has no _layers link in repo"),
    "child_not_in_repo": KindInfo(E, "index child manifest's revision link is damaged"),
    "index_child_deleted": KindInfo(W, "index lists a child deleted from the repo (platform unpullable)"),
    "subject_missing": KindInfo(W, "referrer whose subject manifest is not in the repository"),
    # layers (verify --deep)
    "layer_diff_id_mismatch": KindInfo(E, "uncompressed layer does not hash to its config's diff_id"),
    "layer_not_tar": KindInfo(E, "decompressed layer is not a readable tar stream"),
    "layer_decompress_error": KindInfo(E, "layer data is truncated or corrupt for its compression"),
    "layer_compression_mismatch": KindInfo(W, "layer media type names another compression than its bytes"),
    "config_diff_ids_invalid": KindInfo(E, "image config unreadable or its diff_ids do not match the layers"),
    # repositories and uploads
    "repo_bad_name": KindInfo(E, "repository path breaks the name grammar"),
    "repo_no_layers": KindInfo(W, "repository with _manifests but no _layers (2.8 GC sweeps it)"),
    "upload_no_startedat": KindInfo(E, "upload without a parsable startedat (never purged)"),
    "upload_stale": KindInfo(W, "upload older than the purge age (168h)"),
    "upload_bad_name": KindInfo(W, "upload directory name is not a UUID"),
    "upload_outside_repo": KindInfo(W, "_uploads directory outside a repository"),
    # the tree itself
    "symlink": KindInfo(E, "symbolic link in the tree (reported, never followed)"),
    "unexpected_entry": KindInfo(W, "file or directory the layout does not put there"),
    "unreadable": KindInfo(E, "file or directory that could not be read (permissions, I/O)"),
    "tmp_leftover": KindInfo(N, "*.tmp file left by an interrupted write"),
    "legacy_entry": KindInfo(N, "legacy tarsum/signature entries (ignored by the registry)"),
    "empty_dir": KindInfo(N, "empty link directory (normal after deletes)"),
}


# Findings about a blob's bytes or existence: their `affected_tags` name every tag, in every
# repository, whose image needs the blob (a layer shared by ten images breaks all ten).
BLOB_KINDS = frozenset({
    "blob_digest_mismatch", "blob_empty", "blob_size_mismatch", "blob_missing_data",
    "blob_data_not_file", "blob_wrong_fanout", "blob_unreadable", "reference_missing",
    "revision_blob_missing", "tag_blob_missing", "layer_link_dangling", "revision_not_manifest",
    "manifest_invalid_json", "manifest_unknown_type", "manifest_too_large", "manifest_too_deep",
    "layer_diff_id_mismatch", "layer_not_tar", "layer_decompress_error",
    "config_diff_ids_invalid",
})


@dataclass(frozen=True)
class Finding:
    """One thing verify found; `path` is relative to ROOT with POSIX separators.

    `affected_tags` are `repo:tag` names: for a finding about a blob (`BLOB_KINDS`) every
    tag of every repository whose image needs that blob; for others the tags of the
    finding's repository that the problem makes unpullable."""

    kind: str
    severity: Severity
    path: str
    message: str
    repo: str | None = None
    tag: str | None = None
    digest: str | None = None
    affected_tags: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["severity"] = str(self.severity)
        data["affected_tags"] = list(self.affected_tags)
        return {k: v for k, v in data.items() if v not in (None, [])}


def safe_text(text: str) -> str:
    """Make a name from the disk printable and JSON-safe (undecodable bytes as \\xNN)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        text = "".join(c if 32 <= ord(c) != 127 else f"\\x{ord(c):02x}" for c in text)
    return text


def make_finding(kind: str, path: str, message: str, *, severity: Severity | None = None,
                 repo: str | None = None, tag: str | None = None, digest: str | None = None,
                 affected_tags: tuple[str, ...] = ()) -> Finding:
    """Build a finding with its catalogue severity and printable names.

    `affected_tags` may be bare tag names of `repo`: they are stored as `repo:tag`.

    `path` is relative to the `v2` directory (as everywhere inside regfsck); findings
    report it relative to the storage root, as an operator would look it up."""
    info = CATALOG[kind]
    return Finding(
        kind=kind,
        severity=severity or info.severity,
        path=safe_text(f"{V2_PREFIX}/{path}" if path else V2_PREFIX),
        message=safe_text(message),
        repo=safe_text(repo) if repo is not None else None,
        tag=safe_text(tag) if tag is not None else None,
        digest=digest,
        affected_tags=tuple(safe_text(f"{repo}:{t}" if repo is not None and ":" not in t else t)
                            for t in affected_tags),
    )


def catalog_markdown() -> str:
    """The README's table of finding kinds (kept in sync by a test)."""
    lines = ["| kind | default severity | meaning |", "|---|---|---|"]
    lines += [f"| `{kind}` | {info.severity} | {info.summary} |" for kind, info in CATALOG.items()]
    return "\n".join(lines)


if __name__ == "__main__":  # `python -m regfsck.findings` prints the README's table
    print(catalog_markdown())
