"""Repair: turn verify's findings into a plan of exact, provable fixes, and apply it.

Only what the tree itself proves is fixed:

* a link whose content is determined by its path (revision, tag-index, sha256 `_layers`
  links) is rewritten to exactly that digest, whatever junk it holds;
* a damaged tag `current/link` gets the one digest of its history that still has a
  revision (several candidates, or a readable but different content: reported, never guessed);
* a config/layer a manifest of the repository needs, present in `blobs/` but not linked,
  gets its `_layers` link; a tagged (or index-listed) manifest whose blob exists gets its
  revision link; a tag missing from its own history gets its index link;
* a blob under the wrong fan-out directory that hashes to its name is moved home;
* a blob whose bytes do not hash to its name is replaced by a verified copy from a
  `--from` source, or else quarantined so the next push re-uploads it (the images to
  re-push are listed); a missing blob is restored from a source when one has it.

The plan is plain data (`RepairPlan`); applying it goes through the shared mutation API
(`session.mutation_session`, `quarantine.Run`): every replaced or removed file is moved to
the quarantine with a journal line first, so `regfsck undo` reverts a repair exactly.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO

from regfsck import layout
from regfsck.checks import valid_revisions
from regfsck.digest import DigestError, parse_digest, quote_bytes
from regfsck.errors import ExitCode, Interrupted, RegfsckError
from regfsck.findings import CATALOG, Finding, Kind, RepairClass, Severity, kinds_where, make_finding
from regfsck.graph import ManifestStore, tag_users
from regfsck.hashing import hash_file
from regfsck.inventory import Inventory, Link
from regfsck.layout import V2_PREFIX
from regfsck.manifest import Manifest, ManifestError, parse_manifest
from regfsck.quarantine import Run
from regfsck.root import RegistryRoot
from regfsck.scanner import Scanner
from regfsck.session import MutationSession, mutation_session
from regfsck.sources import Source, SourceError, open_blob_source
from regfsck.storage import MutableStorage, Stat, Storage, StorageError, open_storage
from regfsck.verify import VerifyOptions, VerifyReport, run_verify
from regfsck.why import ReferenceGraph, paths_to

# Fix actions, in the order they are applied (blobs first, then links that need them).
MOVE_BLOB_HOME = "move_blob_home"
DROP_STRAY_COPY = "drop_stray_copy"
REPLACE_BLOB = "replace_blob"
RESTORE_BLOB = "restore_blob"
QUARANTINE_BLOB = "quarantine_blob"
REWRITE_LINK = "rewrite_link"
CREATE_LINK = "create_link"
ACTION_ORDER = (MOVE_BLOB_HOME, DROP_STRAY_COPY, REPLACE_BLOB, RESTORE_BLOB, QUARANTINE_BLOB,
                REWRITE_LINK, CREATE_LINK)

# What repair does per kind is the catalogue's `repair` policy (findings.RepairClass).
CORRUPT_KINDS = kinds_where(lambda info: info.repair is RepairClass.CORRUPT_BLOB)
MISSING_KINDS = kinds_where(lambda info: info.repair is RepairClass.MISSING_BLOB)
LINK_KINDS = kinds_where(lambda info: info.repair is RepairClass.LINK_CONTENT)
# Settled by the fix of their blob: replaced or quarantined (bytes), restored (existence).
WITH_BYTES_KINDS = CORRUPT_KINDS | kinds_where(lambda info: info.repair is RepairClass.BLOB_SIZE)
WITH_EXISTENCE_KINDS = MISSING_KINDS | kinds_where(
    lambda info: info.repair is RepairClass.DANGLING_LINK)
# What else a rewritten link makes right (same repository and digest).
FOLLOW_ON = {
    "layer": frozenset({"reference_not_linked"}),
    "revision": frozenset({"tag_revision_missing", "child_not_in_repo", "tag_index_orphan"}),
}

class RepairError(RegfsckError):
    """Repair cannot run or had to stop (the message says why; exit 3)."""


def _rooted(path: str) -> str:
    return f"{V2_PREFIX}/{path}" if path else V2_PREFIX


def _rel(finding_path: str) -> str:
    prefix = V2_PREFIX + "/"
    return finding_path[len(prefix):] if finding_path.startswith(prefix) else finding_path


# -- the plan -------------------------------------------------------------------------


@dataclass(frozen=True)
class FixOutcome:
    """What applying one fix did: "applied", or "skipped" with why (the tree changed since
    the plan)."""

    status: str
    note: str = ""


@dataclass(frozen=True)
class Fix:
    """One change to the tree; `path` is relative to the v2 directory. A plan's fix stays
    as planned: what applying it did is a `FixOutcome` in the `RepairResult`."""

    action: str
    path: str
    reason: str
    resolves: list[tuple[Kind, str]] = field(default_factory=list)  # (finding kind, v2 path)
    repo: str | None = None
    tag: str | None = None
    digest: str | None = None
    content: str | None = None  # the link content written
    old_content: bytes | None = None  # the link content replaced (re-checked before writing)
    from_path: str | None = None  # move_blob_home: the misplaced data file
    source: str | None = None  # restore/replace: the --from SOURCE used
    size: int | None = None

    def to_json(self, outcome: FixOutcome | None = None) -> dict[str, Any]:
        """The fix, with its `status` (planned, applied, skipped) and `note` from `outcome`."""
        data: dict[str, Any] = {"action": self.action, "path": _rooted(self.path),
                                "reason": self.reason,
                                "status": outcome.status if outcome else "planned"}
        for key in ("repo", "tag", "digest", "content", "source", "size"):
            value = getattr(self, key)
            if value is not None:
                data[key] = value
        if self.old_content is not None:
            data["old_content"] = self.old_content.decode("ascii", "backslashreplace")
        if self.from_path is not None:
            data["from_path"] = _rooted(self.from_path)
        if outcome is not None and outcome.note:
            data["note"] = outcome.note
        data["resolves"] = sorted({str(kind) for kind, _ in self.resolves})
        return data


@dataclass
class Unfixable:
    """A finding no provable fix covers, with what the operator can do."""

    finding: Finding
    advice: str

    def to_json(self) -> dict[str, Any]:
        return {**self.finding.to_json(), "advice": self.advice}


@dataclass
class LostBlob:
    """A blob that is gone (or will be quarantined): the images needing a re-push."""

    digest: str
    why: str
    images: list[str]

    def to_json(self) -> dict[str, Any]:
        return {"digest": self.digest, "why": self.why, "images": self.images}


@dataclass
class RepairPlan:
    fixes: list[Fix] = field(default_factory=list)
    unfixable: list[Unfixable] = field(default_factory=list)
    lost: list[LostBlob] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    findings_seen: int = 0
    data_checked: bool = True
    # --changed-only: blobs the verification record vouched for, not re-hashed by the plan
    blobs_skipped: int = 0
    bytes_skipped: int = 0
    # The plan's verify kept the verification record (ROOT/regfsck-state) up to date, so an
    # `--apply --changed-only` after it re-hashes only what changed in between.
    verdicts_recorded: bool = False

    @property
    def repush(self) -> list[str]:
        """Every image that must be pushed again (its blobs are lost)."""
        return sorted({image for lost in self.lost for image in lost.images})

    def to_json(self) -> dict[str, Any]:
        return {
            "fixes": [f.to_json() for f in self.fixes],
            "unfixable": [u.to_json() for u in self.unfixable],
            "lost_blobs": [b.to_json() for b in self.lost],
            "repush": self.repush,
            "sources": self.sources,
            "findings_seen": self.findings_seen,
            "data_checked": self.data_checked,
            "blobs_skipped": self.blobs_skipped,
            "bytes_skipped": self.bytes_skipped,
            "verdicts_recorded": self.verdicts_recorded,
        }


@dataclass(frozen=True)
class FixesApplied:
    """The outcome of `apply_plan`: the run, whether Ctrl-C ended it, and per fix of the
    plan (same order) its outcome, None for a fix not reached."""

    run_id: str | None
    interrupted: bool
    outcomes: tuple[FixOutcome | None, ...] = ()


@dataclass(frozen=True)
class RepairResult:
    plan: RepairPlan
    applied: bool = False
    run_id: str | None = None
    recovered: list[str] = field(default_factory=list)
    remaining: list[Finding] = field(default_factory=list)  # errors/warnings after --apply
    interrupted: bool = False
    outcomes: tuple[FixOutcome | None, ...] = ()  # per fix of the plan, when applied

    def outcome(self, index: int) -> FixOutcome | None:
        return self.outcomes[index] if index < len(self.outcomes) else None

    def to_json(self) -> dict[str, Any]:
        return {**self.plan.to_json(),
                "fixes": [f.to_json(self.outcome(i)) for i, f in enumerate(self.plan.fixes)],
                "applied": self.applied, "run_id": self.run_id,
                "recovered": self.recovered, "interrupted": self.interrupted,
                "remaining": [f.to_json() for f in self.remaining]}


# -- planning -------------------------------------------------------------------------


@dataclass(frozen=True)
class LinkSite:
    """What a link file is, from where it sits in the tree."""

    kind: str  # revision, layer, tag_index, tag_current
    repo: str
    digest: str | None  # the digest of its path (None for tag current)
    tag: str | None
    link: Link


def link_sites(inventory: Inventory) -> dict[str, LinkSite]:
    """Every link file the scan read, keyed by its path relative to v2."""
    sites: dict[str, LinkSite] = {}
    for name, repo in inventory.repositories.items():
        for digest, link in repo.revisions.items():
            sites[link.path] = LinkSite("revision", name, digest, None, link)
        for digest, link in repo.layers.items():
            sites[link.path] = LinkSite("layer", name, digest, None, link)
        for tag_name, tag in repo.tags.items():
            for digest, link in tag.index.items():
                sites[link.path] = LinkSite("tag_index", name, digest, tag_name, link)
            if tag.current is not None:
                sites[tag.current.path] = LinkSite("tag_current", name, None, tag_name,
                                                   tag.current)
    return sites


def _loose_digest(raw: bytes | None) -> str | None:
    """The digest damaged link bytes still plainly name (trimmed, lower-cased), if any."""
    if not raw:
        return None
    try:
        text = raw.decode("ascii").strip().strip("\x00").lower()
        return str(parse_digest(text))
    except (UnicodeDecodeError, DigestError):
        return None


class _FindingIndex:
    """The findings by the keys a fix looks them up by, built once: each fix names the
    findings it resolves, and searching all findings per fix is quadratic in the damage
    (900 rewritten links: 0.05 s; 10,000: seconds)."""

    def __init__(self, findings: Iterable[Finding]) -> None:
        self.by_digest: dict[str | None, list[Finding]] = {}
        self.by_site: dict[tuple[str | None, str | None], list[Finding]] = {}
        self.by_tag: dict[tuple[str | None, str | None], list[Finding]] = {}
        self.by_repo_kind: dict[tuple[str | None, str], list[Finding]] = {}
        for finding in findings:
            self.by_digest.setdefault(finding.digest, []).append(finding)
            self.by_site.setdefault((finding.repo, finding.digest), []).append(finding)
            self.by_tag.setdefault((finding.repo, finding.tag), []).append(finding)
            self.by_repo_kind.setdefault((finding.repo, finding.kind), []).append(finding)

    def of_digest(self, digest: str, kinds: Iterable[str]) -> list[Finding]:
        wanted = set(kinds)
        return [f for f in self.by_digest.get(digest, ()) if f.kind in wanted]

    def of_site(self, repo: str, digest: str, kinds: Iterable[str]) -> list[Finding]:
        """Findings about `digest` in repository `repo`, of one of `kinds`."""
        wanted = set(kinds)
        return [f for f in self.by_site.get((repo, digest), ()) if f.kind in wanted]

    def of_tag(self, repo: str, tag: str) -> list[Finding]:
        return self.by_tag.get((repo, tag), [])

    def of_repo(self, repo: str, kind: str) -> list[Finding]:
        return self.by_repo_kind.get((repo, kind), [])


class Planner:
    """Derives the fixes from one verify report over one inventory."""

    def __init__(self, inventory: Inventory, store: ManifestStore, findings: list[Finding],
                 sources: list[Source], *, data_checked: bool = True,
                 restore_deleted: bool = False) -> None:
        self.inv = inventory
        # Index children deleted from a repository (through the API, or by a collector)
        # are a deliberate state: their revision links come back only when asked.
        self.restore_deleted = restore_deleted
        self.store = store
        self.storage: Storage = store.storage  # the one the inventory was listed from
        self.findings = findings
        self.index = _FindingIndex(findings)
        self.sources = sources
        self.plan = RepairPlan(sources=[s.label for s in sources], findings_seen=len(findings),
                               data_checked=data_checked)
        self.sites = link_sites(inventory)
        self.corrupt = {f.digest for f in findings
                        if f.kind in CORRUPT_KINDS and f.digest is not None
                        and f.digest in inventory.blobs}
        self.good = set(inventory.blobs) - self.corrupt  # blobs sound after the fixes
        self.decided: set[str] = set()  # digests whose blob fate is settled
        self.from_source: dict[str, Source] = {}  # digests that a source will provide
        self.lost: dict[str, str] = {}  # digest -> why
        self.revisions: dict[str, set[str]] = {n: valid_revisions(r)
                                               for n, r in inventory.repositories.items()}
        # digests with a `_layers` link file in place (damaged ones get rewritten, not created)
        self.linked: dict[str, set[str]] = {n: set(r.layers)
                                            for n, r in inventory.repositories.items()}
        self._parsed: dict[str, Manifest | None] = {}
        self._reported: set[tuple[Kind, str]] = set()  # findings explained by a specific refusal

    # -- helpers -------------------------------------------------------------------
    def add(self, fix: Fix) -> None:
        self.plan.fixes.append(fix)

    def manifest(self, digest: str) -> Manifest | None:
        """The manifest `digest` as it will be after the fixes (from the tree or a source)."""
        if digest in self._parsed:
            return self._parsed[digest]
        parsed: Manifest | None = None
        source = self.from_source.get(digest)
        if source is not None:
            try:
                parsed = parse_manifest(source.read_manifest(digest))
            except (SourceError, StorageError, ManifestError):
                parsed = None
        elif digest in self.good:
            parsed = self.store.get(digest)
        self._parsed[digest] = parsed
        return parsed

    def _source_for(self, digest: str) -> Source | None:
        if not digest.startswith("sha256:"):
            return None
        for source in self.sources:
            if source.size(digest) is not None and source.verify({digest}):
                return source
        return None

    # -- blobs -----------------------------------------------------------------------
    def plan_misplaced(self) -> None:
        for blob in self.inv.misplaced_blobs:
            stray_dir = blob.path.rpartition("/")[0]
            where = [(Kind.BLOB_WRONG_FANOUT, blob.path)]
            try:
                actual, _ = hash_file(self.storage, blob.path, blob.digest.partition(":")[0])
            except StorageError as exc:
                self.plan.unfixable.append(Unfixable(
                    _finding("blob_wrong_fanout", blob.path, exc.message, blob.digest),
                    CATALOG[Kind.UNREADABLE].advice))
                continue
            home = layout.blob_data(blob.digest)
            if actual != blob.digest:
                self.add(Fix(QUARANTINE_BLOB, stray_dir, f"misplaced copy hashes to {actual}, not "
                             "to its name; the registry never reads it", where,
                             digest=blob.digest, size=blob.size))
            elif blob.digest in self.good:
                self.add(Fix(DROP_STRAY_COPY, stray_dir, "identical copy of a healthy blob, "
                             "under the wrong fan-out directory", where, digest=blob.digest,
                             size=blob.size))
            elif blob.digest in self.decided:
                self.add(Fix(DROP_STRAY_COPY, stray_dir, "a second misplaced copy", where,
                             digest=blob.digest, size=blob.size))
            else:
                replaces = blob.digest in self.corrupt
                resolves = where + self._blob_findings(blob.digest)
                self.add(Fix(MOVE_BLOB_HOME, home, "misplaced copy hashes to its name"
                             + ("; the corrupt copy at home is quarantined" if replaces else ""),
                             resolves, digest=blob.digest, from_path=blob.path, size=blob.size))
                self.corrupt.discard(blob.digest)
                self.good.add(blob.digest)
                self.decided.add(blob.digest)

    def _blob_findings(self, digest: str) -> list[tuple[Kind, str]]:
        return [(f.kind, _rel(f.path))
                for f in self.index.of_digest(digest, WITH_BYTES_KINDS | WITH_EXISTENCE_KINDS)]

    def plan_corrupt(self) -> None:
        for digest in sorted(self.corrupt - self.decided):
            self.decided.add(digest)
            blob = self.inv.blobs[digest]
            source = self._source_for(digest)
            resolves = self._blob_findings(digest)
            if source is not None:
                self.add(Fix(REPLACE_BLOB, layout.blob_data(digest), "bytes do not match the "
                             f"digest; verified copy in {source.label}", resolves, digest=digest,
                             source=source.label, size=source.size(digest)))
                self.from_source[digest] = source
                self.good.add(digest)
            else:
                resolves = [r for r in resolves if r[0] in WITH_BYTES_KINDS]
                self.add(Fix(QUARANTINE_BLOB, layout.blob_dir(digest), "bytes do not match the "
                             "digest and no source has a good copy: quarantined so that the next "
                             "push uploads it again", resolves, digest=digest, size=blob.size))
                self.lost[digest] = "corrupt (quarantined)"

    def plan_missing(self, digests: Iterable[str]) -> bool:
        """Restore missing blobs from the sources; True when something new was decided."""
        changed = False
        for digest in sorted(set(digests) - self.decided - self.good):
            self.decided.add(digest)
            changed = True
            source = self._source_for(digest)
            if source is None:
                self.lost[digest] = "missing"
                continue
            self.add(Fix(RESTORE_BLOB, layout.blob_data(digest), f"missing; verified copy in "
                         f"{source.label}", self._blob_findings(digest), digest=digest,
                         source=source.label, size=source.size(digest)))
            self.from_source[digest] = source
            self.good.add(digest)
        return changed

    def missing_references(self) -> set[str]:
        """Blobs the repositories' manifests (as they will be) need and do not have."""
        wanted: set[str] = set()
        for name in self.inv.repositories:
            for digest in self._needed_manifests(name):
                if digest not in self.good:
                    wanted.add(digest)
                    continue
                manifest = self.manifest(digest)
                for edge in self.store.reach.edges_of(digest, manifest) if manifest else ():
                    if edge.optional and edge.blob is None:
                        continue  # a foreign layer served from its `urls`
                    if edge.node not in self.good:  # an alias counts as its stored blob
                        wanted.add(edge.digest)
        return wanted

    def _needed_manifests(self, repo: str) -> set[str]:
        """Revisions of `repo` plus the targets of its tags (they need a manifest blob)."""
        return self.revisions[repo] | set(self.inv.repositories[repo].tag_targets().values())

    # -- links -----------------------------------------------------------------------
    def plan_links(self) -> None:
        for finding in self.findings:
            if finding.kind not in LINK_KINDS:
                continue
            site = self.sites.get(_rel(finding.path))
            if site is None or site.kind == "tag_current":
                continue
            link = site.link
            assert site.digest is not None
            if link.target is None and link.raw is None:
                continue  # a symlink, directory or unreadable file: never written through
            if site.kind == "layer" and not site.digest.startswith("sha256:"):
                continue  # an alias link: its content is not its path
            follow = FOLLOW_ON.get(site.kind, frozenset())
            resolves = [(finding.kind, link.path)] + [
                (f.kind, _rel(f.path)) for f in self.index.of_site(site.repo, site.digest, follow)]
            self.add(Fix(REWRITE_LINK, link.path, f"{site.kind.replace('_', ' ')} link holds "
                         f"{_describe(link)}; its path says {site.digest}",
                         resolves, repo=site.repo, tag=site.tag,
                         digest=site.digest, content=site.digest, old_content=_raw(link)))
            if site.kind == "revision":
                self.revisions[site.repo].add(site.digest)
            elif site.kind == "layer":
                self.linked[site.repo].add(site.digest)

    def plan_revisions_and_layer_links(self) -> None:
        """Revision links for tag targets and index children, `_layers` links for their blobs."""
        for name, repo in sorted(self.inv.repositories.items()):
            tagged = set(repo.tag_targets().values())
            pending = sorted(tagged | self.revisions[name])
            seen: set[str] = set()
            while pending:
                digest = pending.pop()
                if digest in seen:
                    continue
                seen.add(digest)
                manifest = self.manifest(digest) if digest in self.good else None
                if manifest is None:
                    continue
                if digest not in self.revisions[name]:
                    if digest not in tagged and not self.restore_deleted:
                        continue  # an index child deleted on purpose (`index_child_deleted`)
                    self._create_revision(name, digest)
                for edge in self.store.reach.edges_of(digest, manifest):
                    ref = edge.descriptor
                    if edge.node not in self.good or (edge.optional and ref.digest != edge.node):
                        continue
                    if ref.role == "manifest":
                        pending.append(ref.digest)
                    elif ref.digest not in self.linked[name]:
                        self._create_layer_link(name, ref.digest, digest, edge.node)

    def _create_revision(self, repo: str, digest: str) -> None:
        path = layout.revision_link(repo, digest)
        if path in self.sites:  # a link is there (damaged ones are rewritten, not created)
            return
        resolves = [(f.kind, _rel(f.path)) for f in self.index.of_site(
            repo, digest, ("tag_revision_missing", "child_not_in_repo", "index_child_deleted"))]
        self.add(Fix(CREATE_LINK, path, "the manifest blob exists and a tag or index of the "
                     "repository names it, but the revision link is missing", resolves,
                     repo=repo, digest=digest, content=digest))
        self.revisions[repo].add(digest)

    def _create_layer_link(self, repo: str, digest: str, manifest: str,
                           stored: str | None = None) -> None:
        """`_layers/<alg>/<hex>/link` for `digest`, holding the stored blob's digest (for a
        sha512/sha384 alias the canonical sha256, as the registry writes it)."""
        path = layout.layer_link(repo, digest)
        if path in self.sites:
            return
        resolves = [(f.kind, _rel(f.path))
                    for f in self.index.of_site(repo, digest, ("reference_not_linked",))]
        resolves += [(Kind.REPO_NO_LAYERS, _rel(f.path))
                     for f in self.index.of_repo(repo, "repo_no_layers")]
        self.add(Fix(CREATE_LINK, path, f"blob is referenced by manifest {manifest} but not "
                     "linked in the repository (the registry answers 'blob unknown')", resolves,
                     repo=repo, digest=digest, content=stored or digest))
        self.linked[repo].add(digest)

    def plan_tags(self) -> None:
        for name, repo in sorted(self.inv.repositories.items()):
            for tag_name, tag in sorted(repo.tags.items()):
                current = tag.current
                if current is None or current.target is None:
                    self._fix_current(name, tag_name)
                    continue
                target = current.target
                if tag.index and target not in tag.index and target in self.revisions[name]:
                    path = layout.tag_index_link(name, tag_name, target)
                    if path not in self.sites:
                        resolves = [(f.kind, _rel(f.path))
                                    for f in self.index.of_tag(name, tag_name)
                                    if f.kind == "tag_index_missing_current"]
                        self.add(Fix(CREATE_LINK, path, "the tag's current digest is missing "
                                     "from its history", resolves, repo=name, tag=tag_name,
                                     digest=target, content=target))

    def _fix_current(self, repo_name: str, tag_name: str) -> None:
        tag = self.inv.repositories[repo_name].tags[tag_name]
        path = layout.tag_current_link(repo_name, tag_name)
        related = [f for f in self.index.of_tag(repo_name, tag_name)
                   if f.kind == "tag_no_current" or (f.kind in LINK_KINDS and _rel(f.path) == path)]
        candidates = sorted(d for d in tag.index if d in self.revisions[repo_name]
                            and d in self.good)
        named = _loose_digest(tag.current.raw) if tag.current is not None else None
        if tag.current is not None and tag.current.raw is None:
            return  # not a readable regular file: left to the operator
        if len(candidates) != 1 or (named is not None and named != candidates[0]):
            history = ", ".join(candidates) or "none"
            why = (f"its history holds {len(candidates)} digests with a revision ({history})"
                   if named is None or len(candidates) != 1 else
                   f"its content names {named} but its history holds {candidates[0]}")
            for finding in related:
                self.plan.unfixable.append(Unfixable(finding, f"cannot choose the tag's digest: "
                                                     f"{why}; re-push the tag or write the digest "
                                                     "into current/link by hand"))
            self._reported.update((f.kind, _rel(f.path)) for f in related)
            return
        digest = candidates[0]
        resolves = [(f.kind, _rel(f.path)) for f in related]
        if tag.current is None:
            self.add(Fix(CREATE_LINK, path, "tag has no current/link; its history holds exactly "
                         f"one digest with a revision, {digest}", resolves, repo=repo_name,
                         tag=tag_name, digest=digest, content=digest))
        else:
            self.add(Fix(REWRITE_LINK, path, f"current/link holds {_describe(tag.current)}; its "
                         f"history holds exactly one digest with a revision, {digest}", resolves,
                         repo=repo_name, tag=tag_name, digest=digest, content=digest,
                         old_content=_raw(tag.current)))

    # -- the whole plan ----------------------------------------------------------------
    def build(self) -> RepairPlan:
        self.plan_misplaced()
        self.plan_corrupt()
        self.plan_links()
        while self.plan_missing(self.missing_references()):
            pass  # restored manifests may need blobs of their own
        self.plan_revisions_and_layer_links()
        self.plan_tags()
        self.plan.fixes.sort(key=lambda f: (ACTION_ORDER.index(f.action), f.path))
        self._lost_images()
        self._unfixable()
        return self.plan

    def _lost_images(self) -> None:
        """For each lost blob, the images to push again: every tag whose image needs it
        (graph.tag_users: a tagged index covers its children, so the index's tag is named,
        never the child), and untagged revisions no tag of their repository reaches."""
        if not self.lost:
            return
        graph = ReferenceGraph(self.inv, self.store)
        paths = {digest: paths_to(graph, digest) for digest in self.lost}
        wanted = set(self.lost) | {p.manifest for found in paths.values() for p in found}
        users = tag_users(self.inv, self.store, wanted)
        for digest, why in sorted(self.lost.items()):
            images = set(users.get(digest, ()))
            for path in paths[digest]:
                if path.tags:
                    continue
                reached_by_tag = any(u.startswith(f"{path.repo}:") for u in users.get(path.manifest, ()))
                if not reached_by_tag:
                    images.add(f"{path.repo}@{path.manifest}")
            self.plan.lost.append(LostBlob(digest, why, sorted(images)))

    def _unfixable(self) -> None:
        resolved = {r for fix in self.plan.fixes for r in fix.resolves} | self._reported
        lost = set(self.lost)
        for finding in self.findings:
            if finding.severity is Severity.INFO or (finding.kind, _rel(finding.path)) in resolved:
                continue
            if finding.kind == "subject_missing" and self._subject_restored(finding):
                continue
            advice = CATALOG[finding.kind].advice
            if finding.digest in lost and finding.kind in WITH_EXISTENCE_KINDS:
                advice = ("lost: push again one of the images listed under \"Blobs lost\", or "
                          "repair --from a backup that has it")
            self.plan.unfixable.append(Unfixable(finding, advice))


    def _subject_restored(self, finding: Finding) -> bool:
        """A referrer's subject whose revision link the plan makes valid again."""
        referrer = self.manifest(finding.digest) if finding.digest else None
        subject = referrer.subject.digest if referrer and referrer.subject else None
        return subject is not None and finding.repo is not None and (
            subject in self.revisions.get(finding.repo, set()))


def _finding(kind: str, path: str, message: str, digest: str | None = None) -> Finding:
    return make_finding(kind, path, message, digest=digest)


def _raw(link: Link) -> bytes:
    return link.raw if link.raw is not None else (link.target or "").encode()


def _describe(link: Link) -> str:
    if link.raw is not None:
        return quote_bytes(link.raw[:80])
    return link.target or "nothing readable"


def plan_repair(root: RegistryRoot, sources: list[Source], *,
                check: VerifyOptions | None = None, stop: threading.Event | None = None,
                restore_deleted: bool = False,
                ) -> tuple[RepairPlan, VerifyReport, Inventory]:
    """Verify the tree as `check` says (default: every blob re-hashed) and plan the fixes.

    `check.changed_only` re-hashes only the blobs the verification record does not vouch
    for (new, stat changed, bad or old verdict): right after a `verify` or a dry run, what
    they found corrupt is hashed again and found again, and the store is not read once more
    in full just to plan. The tree is listed once (on object storage: one flat listing) and
    verify judges that same inventory: the plan and the findings it answers describe one
    state of the tree."""
    check = check if check is not None else VerifyOptions()
    storage = open_storage(root, jobs=check.jobs if root.is_object_storage else None)
    inventory = Scanner(storage, root).scan()
    report = run_verify(root, check, stop=stop, inventory=inventory, storage=storage)
    if report.summary.interrupted:
        raise Interrupted("interrupted before anything was changed")
    planner = Planner(inventory, ManifestStore(storage, inventory), report.findings, sources,
                      data_checked=check.check_data, restore_deleted=restore_deleted)
    summary = report.summary
    plan = replace(planner.build(), blobs_skipped=summary.blobs_skipped,
                   bytes_skipped=summary.bytes_skipped,
                   verdicts_recorded=(check.check_data and summary.record is not None
                                      and summary.record_error is None))
    return plan, report, inventory


# -- applying ---------------------------------------------------------------------------


class Applier:
    """Applies a plan's fixes in order inside one journaled run; re-checks each first.

    Every look at the tree goes through the run's own backend (`run.storage`, rooted at
    ROOT), which answers from the tree as it is now (on object storage a fresh request,
    never the listing the plan was made from): a fix is re-checked against the present."""

    def __init__(self, root: RegistryRoot, run: Run, sources: list[Source]) -> None:
        self.root = root
        self.run = run
        self.storage = _V2View(run.storage)
        self.sources = {s.label: s for s in sources}

    def apply(self, fix: Fix) -> FixOutcome:
        """Apply one fix, or skip it (saying why) when the tree changed since the plan."""
        handler = {
            REWRITE_LINK: self._rewrite_link, CREATE_LINK: self._create_link,
            MOVE_BLOB_HOME: self._move_home, DROP_STRAY_COPY: self._quarantine,
            QUARANTINE_BLOB: self._quarantine, REPLACE_BLOB: self._from_source,
            RESTORE_BLOB: self._from_source,
        }[fix.action]
        why_not = handler(fix)
        return FixOutcome("skipped", why_not) if why_not else FixOutcome("applied")

    def _rewrite_link(self, fix: Fix) -> str | None:
        assert fix.content is not None
        self.run.settle(fix.path)
        try:
            now = self.storage.read_small(fix.path, 4096)
        except StorageError as exc:
            return f"changed since the plan: {exc.message}"
        if now != fix.old_content:
            return "the link changed since the plan"
        self.run.replace_file(fix.path, fix.content.encode("ascii"))
        return None

    def _create_link(self, fix: Fix) -> str | None:
        assert fix.content is not None
        self.run.settle(fix.path)
        if self.storage.stat(fix.path) is not None:
            return "the link appeared since the plan"
        self.run.create_file(fix.path, fix.content.encode("ascii"))
        return None

    def _quarantine(self, fix: Fix) -> str | None:
        self.run.settle(fix.path)
        if self.storage.stat(fix.path) is None:
            return "gone since the plan"
        self.run.quarantine(fix.path)
        return None

    def _move_home(self, fix: Fix) -> str | None:
        # The copy is written home before the stray directory is quarantined: on object
        # storage a quarantine move deletes the source, which a stream may still be reading.
        assert fix.from_path is not None and fix.digest is not None
        stray_dir = fix.from_path.rpartition("/")[0]
        self.run.settle(fix.path, fix.from_path)
        if self.storage.stat(fix.path) is not None:
            self.run.quarantine(layout.blob_dir(fix.digest))  # the corrupt copy at home
        with self.storage.open_read(fix.from_path) as stream:
            written = self.run.create_file(fix.path, stream)
        if written != fix.digest:
            raise RepairError(f"repair stopped, nothing changed: the copy of {fix.from_path} "
                              f"hashes to {written}, not {fix.digest}; the run is reverted")
        self.run.quarantine(stray_dir)
        return None

    def _from_source(self, fix: Fix) -> str | None:
        assert fix.source is not None and fix.digest is not None
        source = self.sources[fix.source]
        source.prepare({fix.digest}, self.root)
        try:
            stream = source.open(fix.digest)
        except StorageError as exc:
            return f"source copy unavailable: {exc.message}"
        self.run.settle(fix.path)
        with stream:
            if fix.action == REPLACE_BLOB:
                if self.storage.stat(layout.blob_dir(fix.digest)) is not None:
                    self.run.quarantine(layout.blob_dir(fix.digest))
            elif self.storage.stat(fix.path) is not None:
                return "the blob appeared since the plan"
            written = self.run.create_file(fix.path, stream)
        if written != fix.digest:
            raise RepairError(f"repair stopped, nothing changed: the copy from {fix.source} "
                              f"hashes to {written}, not {fix.digest}; the run is reverted")
        return None


class _V2View:
    """The reads the Applier makes, by v2-relative path, through a backend rooted at ROOT."""

    def __init__(self, storage: MutableStorage) -> None:
        self.storage = storage

    def stat(self, path: str) -> Stat | None:
        return self.storage.stat(f"{V2_PREFIX}/{path}")

    def read_small(self, path: str, limit: int) -> bytes:
        return self.storage.read_small(f"{V2_PREFIX}/{path}", limit)

    def open_read(self, path: str) -> BinaryIO:
        return self.storage.open_read(f"{V2_PREFIX}/{path}")


def apply_plan(session: MutationSession, plan: RepairPlan, sources: list[Source], *,
               stop: threading.Event | None = None) -> FixesApplied:
    """Apply `plan` in one journaled run of `session` (regfsck.session).

    Archive sources spool the blobs they provide first (verified). Ctrl-C (`stop`) ends the
    run between two fixes: what was applied stays, and `undo` reverts it. Between fixes the
    session is asked again, at least every USERS_EVERY_S, whether the tree may change
    (`session.check_unused`, as gc does between batches): a registry that started, or
    turned writable (object storage), stops the run there as a SafetyError, what was
    applied kept and undoable (reverting while a registry writes would be one more change
    under it)."""
    import time

    from regfsck.safety import SafetyError
    from regfsck.sweep import USERS_EVERY_S
    from regfsck.sweep import _pause as pause_point

    root = session.root
    todo = plan.fixes
    if not todo:
        return FixesApplied(None, False)
    wanted: dict[str, set[str]] = {}
    for fix in todo:
        if fix.source is not None and fix.digest is not None:
            wanted.setdefault(fix.source, set()).add(fix.digest)
    by_label = {s.label: s for s in sources}
    for label, digests in wanted.items():
        by_label[label].prepare(digests, root)
    details = {"fixes": len(todo), "sources": plan.sources,
               "actions": sorted({f.action for f in todo})}
    interrupted = False
    blocked: SafetyError | None = None
    outcomes: list[FixOutcome | None] = []
    checked = time.monotonic()  # the session asked just now, before the plan
    with session.begin(details, on_crash="revert") as run:
        applier = Applier(root, run, sources)
        with run.batch():  # one filesystem flush per batch of fixes (the Applier settles what it reads)
            for number, fix in enumerate(todo):
                if stop is not None and stop.is_set():
                    interrupted = True
                    break
                pause_point(f"repair.{number}")
                if time.monotonic() - checked >= USERS_EVERY_S:
                    try:
                        session.check_unused()
                    except SafetyError as exc:
                        blocked = exc
                        break
                    checked = time.monotonic()
                outcomes.append(applier.apply(fix))
        done = sum(1 for o in outcomes if o is not None and o.status == "applied")
        run.finish(f"{done} fixes applied" + (" (interrupted)" if interrupted else "")
                   + (" (stopped: the tree may be in use)" if blocked else ""))
    if blocked is not None:
        raise SafetyError(f"stopped after {done} of {len(todo)} fixes: {blocked}. What was "
                          f"applied is kept in run {run.run_id} (see `regfsck runs`; revert "
                          f"it with `regfsck undo {root.display} {run.run_id}` once nothing "
                          "uses the tree)") from blocked
    outcomes += [None] * (len(todo) - len(outcomes))
    return FixesApplied(run.run_id, interrupted, tuple(outcomes))


def run_repair(root: RegistryRoot, sources: list[Source], *, apply: bool,
               check: VerifyOptions | None = None, stop: threading.Event | None = None,
               restore_deleted: bool = False) -> RepairResult:
    """Plan (and with `apply`, carry out) the repair of `root`.

    Applying happens in a mutation session (regfsck.session: refuses while a registry may
    use ROOT, holds the lock, settles runs a crash left open first); the plan is made under
    the lock, so nothing changes between planning and applying. Afterwards the structure
    is verified again and whatever still needs attention is returned in `remaining`.
    An I/O error stops it as a RepairError ("repair stopped: ..."; an applied run is
    reverted by its journal)."""
    try:
        return _run_repair(root, sources, apply=apply,
                           check=check if check is not None else VerifyOptions(), stop=stop,
                           restore_deleted=restore_deleted)
    except StorageError as exc:
        raise RepairError(f"repair stopped: {exc.message}") from exc
    except SourceError as exc:  # an archive that changed or broke after it was opened
        raise RepairError(f"repair stopped: {exc}") from exc


def open_sources(paths: Iterable[Path]) -> list[Source]:
    """Open every --from SOURCE; one that cannot be used is a bad argument (exit 2), and
    the ones opened before it are closed."""
    opened: list[Source] = []
    for path in paths:
        try:
            opened.append(open_blob_source(path))
        except SourceError as exc:
            for source in opened:
                source.close()
            raise SourceError(str(exc), exc.reason, exit_code=ExitCode.USAGE) from exc
    return opened


def _run_repair(root: RegistryRoot, sources: list[Source], *, apply: bool,
                check: VerifyOptions, stop: threading.Event | None,
                restore_deleted: bool) -> RepairResult:
    if not apply:
        plan, _, _ = plan_repair(root, sources, check=check, stop=stop,
                                 restore_deleted=restore_deleted)
        return RepairResult(plan)
    with mutation_session(root, command="repair") as session:
        recovered = session.recovered
        plan, _, _ = plan_repair(root, sources, check=check, stop=stop,
                                 restore_deleted=restore_deleted)
        try:
            done = apply_plan(session, plan, sources, stop=stop)
        finally:
            for source in sources:
                source.close()
        after = run_verify(root, VerifyOptions(jobs=check.jobs, check_data=False))
    remaining = [f for f in after.findings if f.severity is not Severity.INFO]
    return RepairResult(plan, applied=True, run_id=done.run_id, recovered=recovered,
                        remaining=remaining, interrupted=done.interrupted, outcomes=done.outcomes)
