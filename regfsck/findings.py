"""Findings: the plain-data result of every check, and the catalogue of their kinds.

Each kind has a stable id (scripts match on it) and the whole policy for it in one place,
`CATALOG`: default severity, one line of documentation, what an operator can do (repair's
advice), its severity under `verify --strict`, whether it makes gc refuse, how repair deals
with it, and the sets other modules ask about (blob findings, gc-removable leftovers, parts
reachability cannot read). Commands ask the catalogue instead of keeping their own lists,
so a new kind cannot be half-known. The README's table is generated from it
(`python -m regfsck.findings`) and `regfsck kinds` lists it with its policy.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from regfsck import layout
from regfsck.layout import V2_PREFIX


class Severity(enum.StrEnum):
    ERROR = "error"
    WARNING = "warning"
    INFO = "info"


class Kind(enum.StrEnum):
    """Every finding kind regfsck can report (the ids of `CATALOG`)."""

    BLOB_DIGEST_MISMATCH = "blob_digest_mismatch"
    BLOB_EMPTY = "blob_empty"
    BLOB_SIZE_MISMATCH = "blob_size_mismatch"
    BLOB_MISSING_DATA = "blob_missing_data"
    BLOB_DATA_NOT_FILE = "blob_data_not_file"
    BLOB_WRONG_FANOUT = "blob_wrong_fanout"
    BLOB_BAD_NAME = "blob_bad_name"
    BLOB_UNREADABLE = "blob_unreadable"
    LINK_INVALID = "link_invalid"
    LINK_MISMATCH = "link_mismatch"
    LINK_NOT_FILE = "link_not_file"
    LINK_BAD_PATH = "link_bad_path"
    LINK_ALIAS = "link_alias"
    MISSING_LINK = "missing_link"
    LAYER_LINK_DANGLING = "layer_link_dangling"
    REVISION_BLOB_MISSING = "revision_blob_missing"
    REVISION_NOT_MANIFEST = "revision_not_manifest"
    TAG_BAD_NAME = "tag_bad_name"
    TAG_NO_CURRENT = "tag_no_current"
    TAG_REVISION_MISSING = "tag_revision_missing"
    TAG_BLOB_MISSING = "tag_blob_missing"
    TAG_INDEX_ORPHAN = "tag_index_orphan"
    TAG_INDEX_MISSING_CURRENT = "tag_index_missing_current"
    MANIFEST_INVALID_JSON = "manifest_invalid_json"
    MANIFEST_UNKNOWN_TYPE = "manifest_unknown_type"
    MANIFEST_TOO_LARGE = "manifest_too_large"
    MANIFEST_TOO_DEEP = "manifest_too_deep"
    MANIFEST_BAD_DESCRIPTOR = "manifest_bad_descriptor"
    MANIFEST_SCHEMA1 = "manifest_schema1"
    MANIFEST_CYCLE = "manifest_cycle"
    REFERENCE_MISSING = "reference_missing"
    REFERENCE_NOT_LINKED = "reference_not_linked"
    CHILD_NOT_IN_REPO = "child_not_in_repo"
    INDEX_CHILD_DELETED = "index_child_deleted"
    SUBJECT_MISSING = "subject_missing"
    LAYER_DIFF_ID_MISMATCH = "layer_diff_id_mismatch"
    LAYER_NOT_TAR = "layer_not_tar"
    LAYER_DECOMPRESS_ERROR = "layer_decompress_error"
    LAYER_COMPRESSION_MISMATCH = "layer_compression_mismatch"
    CONFIG_DIFF_IDS_INVALID = "config_diff_ids_invalid"
    REPO_BAD_NAME = "repo_bad_name"
    REPO_NO_LAYERS = "repo_no_layers"
    UPLOAD_NO_STARTEDAT = "upload_no_startedat"
    UPLOAD_STALE = "upload_stale"
    UPLOAD_BAD_NAME = "upload_bad_name"
    UPLOAD_OUTSIDE_REPO = "upload_outside_repo"
    SYMLINK = "symlink"
    UNEXPECTED_ENTRY = "unexpected_entry"
    UNREADABLE = "unreadable"
    TMP_LEFTOVER = "tmp_leftover"
    LEGACY_ENTRY = "legacy_entry"
    EMPTY_DIR = "empty_dir"


class GcBlock(enum.StrEnum):
    """When a finding makes gc refuse: damage after which the mark set cannot be trusted."""

    NEVER = "never"
    ALWAYS = "always"
    # Link damage decides marking only where links say what is kept: a repository's
    # revisions and tags (under `_manifests`), not its `_layers`; a tag's history
    # (`tags/<t>/index/`) only with `--delete-untagged` (without it every revision is a
    # root, and gc does not read the history).
    MANIFEST_LINKS = "manifest_links"
    # Without a current link, which manifests a tag still wants is unknown: only
    # `--delete-untagged` asks that question.
    DELETE_UNTAGGED = "delete_untagged"


class RepairClass(enum.StrEnum):
    """How `regfsck repair` deals with a kind."""

    CORRUPT_BLOB = "corrupt_blob"  # bad bytes: replaced from --from, else quarantined
    BLOB_SIZE = "blob_size"  # settled with its blob's replacement or quarantine
    MISSING_BLOB = "missing_blob"  # gone: restored from --from, else lost (re-push)
    DANGLING_LINK = "dangling_link"  # settled when its blob is restored
    LINK_CONTENT = "link_content"  # rewritten to the digest its path names
    DERIVED = "derived"  # a link the tree proves is created or rewritten
    MANUAL = "manual"  # no provable fix: the advice says what to do


@dataclass(frozen=True)
class KindInfo:
    """The policy of one kind (see the module docstring)."""

    severity: Severity
    summary: str
    advice: str
    repair: RepairClass
    blocks_gc: GcBlock
    strict: Severity | None = None  # its severity under `verify --strict` (None: unchanged)
    blob: bool = False  # about a blob: `affected_tags` name every tag that needs the blob
    gc_removes: bool = False  # a leftover `regfsck gc --apply` removes
    unknown: bool = False  # a part of the tree reachability cannot read (keep everything)

    def to_json(self) -> dict[str, Any]:
        return {"severity": str(self.severity), "summary": self.summary, "advice": self.advice,
                "strict_severity": str(self.strict or self.severity),
                "repair": str(self.repair), "blocks_gc": str(self.blocks_gc),
                "blob": self.blob, "gc_removes": self.gc_removes, "unknown": self.unknown}


E, W, N = Severity.ERROR, Severity.WARNING, Severity.INFO
R, G = RepairClass, GcBlock

# Advice several kinds share.
FROM_BACKUP = ("repair --from a backup that has the blob; without one `regfsck repair --apply` "
               "quarantines it and the images that need it are pushed again")
RM_REVISION = "remove the revision (`regfsck rm REPO@DIGEST`)"
RM_AND_REPUSH = f"{RM_REVISION} and re-push"
NOT_AS_CONFIG = ("the layer is not what its image config says: push the image again from its "
                 "source, or repair --from a backup")
GC_REMOVES = "`regfsck gc --apply` removes it"
BY_HAND = "inspect and remove it by hand"

# The catalogue as two compact tables, one row a kind: its policy (severity, repair class,
# when it blocks gc, and flags: `strict` is an error under --strict, `blob` is about a blob,
# `gc` is a leftover gc --apply removes, `unknown` is a part reachability cannot read), and
# its words (summary, advice). `CATALOG` joins them; a kind missing from either fails here.
_POLICY: dict[Kind, tuple[Severity, RepairClass, GcBlock, str]] = {
    Kind.BLOB_DIGEST_MISMATCH:       (E, R.CORRUPT_BLOB, G.NEVER, "blob"),
    Kind.BLOB_EMPTY:                 (E, R.CORRUPT_BLOB, G.NEVER, "blob"),
    Kind.BLOB_SIZE_MISMATCH:         (E, R.BLOB_SIZE, G.NEVER, "blob"),
    Kind.BLOB_MISSING_DATA:          (E, R.MISSING_BLOB, G.NEVER, "blob"),
    Kind.BLOB_DATA_NOT_FILE:         (E, R.MANUAL, G.NEVER, "blob"),
    Kind.BLOB_WRONG_FANOUT:          (E, R.DERIVED, G.NEVER, "blob"),
    Kind.BLOB_BAD_NAME:              (E, R.MANUAL, G.NEVER, ""),
    Kind.BLOB_UNREADABLE:            (E, R.CORRUPT_BLOB, G.NEVER, "blob"),
    Kind.LINK_INVALID:               (E, R.LINK_CONTENT, G.MANIFEST_LINKS, ""),
    Kind.LINK_MISMATCH:              (E, R.LINK_CONTENT, G.MANIFEST_LINKS, ""),
    Kind.LINK_NOT_FILE:              (E, R.MANUAL, G.MANIFEST_LINKS, ""),
    Kind.LINK_BAD_PATH:              (E, R.MANUAL, G.MANIFEST_LINKS, ""),
    Kind.LINK_ALIAS:                 (N, R.MANUAL, G.NEVER, ""),
    Kind.MISSING_LINK:               (W, R.MANUAL, G.MANIFEST_LINKS, ""),
    Kind.LAYER_LINK_DANGLING:        (W, R.DANGLING_LINK, G.NEVER, "strict blob gc"),
    Kind.REVISION_BLOB_MISSING:      (E, R.MISSING_BLOB, G.ALWAYS, "blob"),
    Kind.REVISION_NOT_MANIFEST:      (E, R.MANUAL, G.ALWAYS, "blob"),
    Kind.TAG_BAD_NAME:               (E, R.MANUAL, G.NEVER, ""),
    Kind.TAG_NO_CURRENT:             (W, R.DERIVED, G.DELETE_UNTAGGED, "strict"),
    Kind.TAG_REVISION_MISSING:       (E, R.DERIVED, G.ALWAYS, ""),
    Kind.TAG_BLOB_MISSING:           (E, R.MISSING_BLOB, G.ALWAYS, "blob"),
    Kind.TAG_INDEX_ORPHAN:           (N, R.DERIVED, G.NEVER, ""),
    Kind.TAG_INDEX_MISSING_CURRENT:  (W, R.DERIVED, G.NEVER, ""),
    Kind.MANIFEST_INVALID_JSON:      (E, R.MANUAL, G.ALWAYS, "blob"),
    Kind.MANIFEST_UNKNOWN_TYPE:      (E, R.MANUAL, G.ALWAYS, "blob"),
    Kind.MANIFEST_TOO_LARGE:         (E, R.MANUAL, G.ALWAYS, "blob"),
    Kind.MANIFEST_TOO_DEEP:          (E, R.MANUAL, G.ALWAYS, "blob"),
    Kind.MANIFEST_BAD_DESCRIPTOR:    (E, R.MANUAL, G.ALWAYS, ""),
    Kind.MANIFEST_SCHEMA1:           (W, R.MANUAL, G.NEVER, ""),
    Kind.MANIFEST_CYCLE:             (E, R.MANUAL, G.NEVER, ""),
    Kind.REFERENCE_MISSING:          (E, R.MISSING_BLOB, G.NEVER, "blob"),
    Kind.REFERENCE_NOT_LINKED:       (E, R.DERIVED, G.NEVER, ""),
    Kind.CHILD_NOT_IN_REPO:          (E, R.DERIVED, G.NEVER, ""),
    Kind.INDEX_CHILD_DELETED:        (W, R.DERIVED, G.NEVER, ""),
    Kind.SUBJECT_MISSING:            (W, R.DERIVED, G.NEVER, "strict"),
    Kind.LAYER_DIFF_ID_MISMATCH:     (E, R.MANUAL, G.NEVER, "blob"),
    Kind.LAYER_NOT_TAR:              (E, R.MANUAL, G.NEVER, "blob"),
    Kind.LAYER_DECOMPRESS_ERROR:     (E, R.MANUAL, G.NEVER, "blob"),
    Kind.LAYER_COMPRESSION_MISMATCH: (W, R.MANUAL, G.NEVER, ""),
    Kind.CONFIG_DIFF_IDS_INVALID:    (E, R.MANUAL, G.NEVER, "blob"),
    Kind.REPO_BAD_NAME:              (E, R.MANUAL, G.NEVER, ""),
    Kind.REPO_NO_LAYERS:             (W, R.DERIVED, G.NEVER, ""),
    Kind.UPLOAD_NO_STARTEDAT:        (E, R.MANUAL, G.NEVER, "gc"),
    Kind.UPLOAD_STALE:               (W, R.MANUAL, G.NEVER, "gc"),
    Kind.UPLOAD_BAD_NAME:            (W, R.MANUAL, G.NEVER, ""),
    Kind.UPLOAD_OUTSIDE_REPO:        (W, R.MANUAL, G.NEVER, ""),
    Kind.SYMLINK:                    (E, R.MANUAL, G.ALWAYS, "unknown"),
    Kind.UNEXPECTED_ENTRY:           (W, R.MANUAL, G.NEVER, ""),
    Kind.UNREADABLE:                 (E, R.MANUAL, G.ALWAYS, "unknown"),
    Kind.TMP_LEFTOVER:               (N, R.MANUAL, G.NEVER, "gc"),
    Kind.LEGACY_ENTRY:               (N, R.MANUAL, G.NEVER, ""),
    Kind.EMPTY_DIR:                  (N, R.MANUAL, G.NEVER, "gc"),
}

_TEXT: dict[Kind, tuple[str, str]] = {
    Kind.BLOB_DIGEST_MISMATCH: ("blob data does not hash to its name (re-hashed twice)",
        FROM_BACKUP),
    Kind.BLOB_EMPTY: ("zero-byte blob data under a digest other than the empty one",
        FROM_BACKUP),
    Kind.BLOB_SIZE_MISMATCH: ("blob size differs from a descriptor that references it",
        "the blob hashes to its name, so the manifest's descriptor is wrong: re-push the image"),
    Kind.BLOB_MISSING_DATA: ("blob directory without a data file",
        "an empty blob directory: repair --from a backup, or re-push"),
    Kind.BLOB_DATA_NOT_FILE: ("blob data is a directory or special file",
        "inspect by hand; regfsck never touches special files"),
    Kind.BLOB_WRONG_FANOUT: ("blob stored under the wrong two-character fan-out dir",
        "the misplaced copy could not be verified: inspect it by hand"),
    Kind.BLOB_BAD_NAME: ("blob path component is not a valid algorithm/hex name",
        "a directory in blobs/ that is not a digest: inspect it by hand"),
    Kind.BLOB_UNREADABLE: ("blob data could not be read",
        "fix permissions or the disk, then verify again; bad bytes: repair --from a backup"),
    Kind.LINK_INVALID: ("link content is not exactly a digest (empty, newline, junk)",
        "the content cannot be derived from the path: re-push the tag, or write the right digest into the "
        "link by hand (see `regfsck inspect`)"),
    Kind.LINK_MISMATCH: ("revision or tag-index link content differs from its path",
        "re-push the tag"),
    Kind.LINK_NOT_FILE: ("a link is a directory or special file",
        "a link that is a directory or special file: inspect it by hand"),
    Kind.LINK_BAD_PATH: ("link directory is not a valid algorithm/hex name",
        "a link directory that is not a digest: inspect and remove it by hand"),
    Kind.LINK_ALIAS: ("_layers alias link (content differs from the path by design)",
        "nothing to do: the registry writes alias links this way"),
    Kind.MISSING_LINK: ("a link directory holds no link file but other entries",
        "a link directory without its link file: inspect by hand"),
    Kind.LAYER_LINK_DANGLING: ("_layers link to a blob that does not exist",
        "normal after the official GC; `regfsck gc --apply` removes it"),
    Kind.REVISION_BLOB_MISSING: ("revision link to a manifest blob that does not exist",
        "re-push the image by tag, or repair --from a backup; if the revision is not wanted, `regfsck rm "
        "REPO@DIGEST`"),
    Kind.REVISION_NOT_MANIFEST: ("revision's blob is not a usable manifest",
        RM_AND_REPUSH),
    Kind.TAG_BAD_NAME: ("tag directory name breaks the tag grammar",
        "remove the tag (`regfsck rm REPO:TAG`)"),
    Kind.TAG_NO_CURRENT: ("tag directory without current/link (listed, unresolvable)",
        "re-push the tag, or remove it (`regfsck rm REPO:TAG`)"),
    Kind.TAG_REVISION_MISSING: ("tag points at a digest with no revision link",
        "the tag's manifest is gone: re-push the tag or remove it (`regfsck rm REPO:TAG`)"),
    Kind.TAG_BLOB_MISSING: ("tag points at a digest whose blob is missing",
        "re-push the tag, or repair --from a backup holding the manifest"),
    Kind.TAG_INDEX_ORPHAN: ("tag history entry whose revision is gone",
        "nothing to do: the registry ignores history entries without a revision"),
    Kind.TAG_INDEX_MISSING_CURRENT: ("tag's current digest is absent from its history",
        "harmless; re-push the tag to restore its history"),
    Kind.MANIFEST_INVALID_JSON: ("manifest blob is not a JSON object",
        "the manifest blob hashes to its name but is not a manifest: remove the revision (`regfsck rm "
        "REPO@DIGEST`) and re-push"),
    Kind.MANIFEST_UNKNOWN_TYPE: ("unknown schemaVersion or mediaType",
        RM_AND_REPUSH),
    Kind.MANIFEST_TOO_LARGE: ("manifest over the registry's 4 MiB limit",
        RM_REVISION),
    Kind.MANIFEST_TOO_DEEP: ("manifest JSON nested deeper than regfsck's bound",
        RM_REVISION),
    Kind.MANIFEST_BAD_DESCRIPTOR: ("a descriptor without a valid digest or size",
        "re-push the image from its source"),
    Kind.MANIFEST_SCHEMA1: ("schema1 manifest: readable by 2.8, refused by 3.x",
        "re-push as schema2 (`skopeo copy --format v2s2`) before moving to registry 3.x"),
    Kind.MANIFEST_CYCLE: ("index/list references itself through its children",
        "remove the index (`regfsck rm REPO@DIGEST`)"),
    Kind.REFERENCE_MISSING: ("config, layer or child blob does not exist",
        "re-push an image that contains the blob (one push restores it for every repository), or run "
        "repair --from a backup that has it"),
    Kind.REFERENCE_NOT_LINKED: ("config/layer exists but has no _layers link in repo",
        "`regfsck repair --apply` links the blob into the repository (it is stored)"),
    Kind.CHILD_NOT_IN_REPO: ("index child manifest's revision link is damaged",
        "the child manifest is missing: re-push the multi-arch image with all platforms (`skopeo copy "
        "--all`) or repair --from a backup"),
    Kind.INDEX_CHILD_DELETED: ("index lists a child deleted from the repo (platform unpullable)",
        "deleted on purpose (API DELETE or a collector): re-push the multi-arch image, or `repair "
        "--restore-deleted` to bring the child back (its blob is still there)"),
    Kind.SUBJECT_MISSING: ("referrer whose subject manifest is not in the repository",
        "push the subject image again, or remove the referrer"),
    Kind.LAYER_DIFF_ID_MISMATCH: ("uncompressed layer does not hash to its config's diff_id",
        NOT_AS_CONFIG),
    Kind.LAYER_NOT_TAR: ("decompressed layer is not a readable tar stream",
        NOT_AS_CONFIG),
    Kind.LAYER_DECOMPRESS_ERROR: ("layer data is truncated or corrupt for its compression",
        "the layer's bytes are damaged: push the image again from its source, or repair --from a backup"),
    Kind.LAYER_COMPRESSION_MISMATCH: ("layer media type names another compression than its bytes",
        "some clients cannot unpack it: push the image again from its source"),
    Kind.CONFIG_DIFF_IDS_INVALID: ("image config unreadable or its diff_ids do not match the layers",
        "push the image again from its source"),
    Kind.REPO_BAD_NAME: ("repository path breaks the name grammar",
        "rename the directory by hand or remove the repository"),
    Kind.REPO_NO_LAYERS: ("repository with _manifests but no _layers (2.8 GC sweeps it)",
        "push one image to the repository (2.8 GC sweeps it otherwise)"),
    Kind.UPLOAD_NO_STARTEDAT: ("upload without a parsable startedat (never purged)",
        GC_REMOVES),
    Kind.UPLOAD_STALE: ("upload older than the purge age (168h)",
        GC_REMOVES),
    Kind.UPLOAD_BAD_NAME: ("upload directory name is not a UUID",
        BY_HAND),
    Kind.UPLOAD_OUTSIDE_REPO: ("_uploads directory outside a repository",
        BY_HAND),
    Kind.SYMLINK: ("symbolic link in the tree (reported, never followed)",
        "regfsck never follows or removes symbolic links: inspect by hand"),
    Kind.UNEXPECTED_ENTRY: ("file or directory the layout does not put there",
        "inspect by hand"),
    Kind.UNREADABLE: ("file or directory that could not be read (permissions, I/O)",
        "fix permissions or the disk, then verify again"),
    Kind.TMP_LEFTOVER: ("*.tmp file left by an interrupted write",
        "harmless leftover of an interrupted write: inspect and remove it by hand"),
    Kind.LEGACY_ENTRY: ("legacy tarsum/signature entries (ignored by the registry)",
        "nothing to do: the registry ignores it"),
    Kind.EMPTY_DIR: ("empty link directory (normal after deletes)",
        "nothing to do (normal after deletes)"),
}


CATALOG: dict[Kind, KindInfo] = {
    kind: KindInfo(severity, *_TEXT[kind], repair, blocks_gc,
                   strict=E if "strict" in flags.split() else None, blob="blob" in flags.split(),
                   gc_removes="gc" in flags.split(), unknown="unknown" in flags.split())
    for kind, (severity, repair, blocks_gc, flags) in _POLICY.items()}


def kinds_where(test: Callable[[KindInfo], bool]) -> frozenset[Kind]:
    """The kinds whose policy passes `test` (modules derive their sets from the catalogue)."""
    return frozenset(kind for kind, info in CATALOG.items() if test(info))


# Findings about a blob's bytes or existence: their `affected_tags` name every tag, in every
# repository, whose image needs the blob (a layer shared by ten images breaks all ten).
BLOB_KINDS = kinds_where(lambda info: info.blob)


@dataclass(frozen=True)
class Finding:
    """One thing verify found; `path` is relative to ROOT with POSIX separators.

    `affected_tags` are `repo:tag` names: for a finding about a blob (`BLOB_KINDS`) every
    tag of every repository whose image needs that blob; for others the tags of the
    finding's repository that the problem makes unpullable."""

    kind: Kind
    severity: Severity
    path: str
    message: str
    repo: str | None = None
    tag: str | None = None
    digest: str | None = None
    affected_tags: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        # Field by field, not `asdict`: its deep copy of every (immutable) value cost more
        # than the rest of sorting 10k findings (repair of 9,000 links, issue 15).
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["kind"] = str(self.kind)
        data["severity"] = str(self.severity)
        data["affected_tags"] = list(self.affected_tags)
        return {k: v for k, v in data.items() if v not in (None, [])}


def safe_text(text: str) -> str:
    """Make a name from the disk printable and JSON-safe (undecodable bytes as \\xNN)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return _CONTROL.sub(_escaped, text)


_CONTROL = re.compile("[\x00-\x1f\x7f]")


def _escaped(match: re.Match[str]) -> str:
    return f"\\x{ord(match.group()):02x}"


def make_finding(kind: Kind | str, path: str, message: str, *, severity: Severity | None = None,
                 repo: str | None = None, tag: str | None = None, digest: str | None = None,
                 affected_tags: tuple[str, ...] = ()) -> Finding:
    """Build a finding with its catalogue severity and printable names.

    `affected_tags` may be bare tag names of `repo`: they are stored as `repo:tag`.

    `path` is relative to the `v2` directory (as everywhere inside regfsck); findings
    report it relative to the storage root, as an operator would look it up. A kind the
    catalogue does not know is a bug: `Kind(kind)` raises rather than report it."""
    kind = Kind(kind)
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


def strict_severity(finding: Finding) -> Severity:
    """The finding's severity under `verify --strict` (warnings that mean "listed by the
    registry but cannot be pulled" become errors)."""
    return CATALOG[finding.kind].strict or finding.severity


def blocks_gc(finding: Finding, delete_untagged: bool) -> bool:
    """Whether this finding makes gc's mark unreliable (gc refuses unless forced).

    For link damage the answer depends on which link it is: the finding's repository's
    `_manifests` (revision and tag links decide what is marked), not its `_layers`.
    Anything inside a tag's history (`tags/<t>/index/`) blocks only `--delete-untagged`:
    without it every revision is a root, the history decides nothing and gc does not read
    it (so what a full scan finds there must not block it either)."""
    rule = CATALOG[finding.kind].blocks_gc
    if not delete_untagged and layout.in_tag_history(finding.path):
        return False
    if rule is GcBlock.MANIFEST_LINKS:
        if finding.repo is None:
            return False
        manifests = layout.join(V2_PREFIX, layout.repo_dir(finding.repo), layout.MANIFESTS_DIR)
        return finding.path.startswith(manifests + "/")
    return rule is GcBlock.ALWAYS or (rule is GcBlock.DELETE_UNTAGGED and delete_untagged)


def catalog_markdown() -> str:
    """The README's table of finding kinds (kept in sync by a test)."""
    lines = ["| kind | default severity | meaning |", "|---|---|---|"]
    lines += [f"| `{kind}` | {info.severity} | {info.summary} |" for kind, info in CATALOG.items()]
    return "\n".join(lines)


if __name__ == "__main__":  # `python -m regfsck.findings` prints the README's table
    print(catalog_markdown())
