"""Structural judgement of an inventory: every check that needs no blob re-hashing.

Input is what the scanner recorded plus parsed manifests; output is a list of findings.
Nothing here touches the disk except through the manifest store (reads only).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from regfsck import layout
from regfsck.digest import EMPTY_SHA256, quote_bytes
from regfsck.findings import Finding, make_finding
from regfsck.graph import ManifestStore, Unloadable, find_cycle, walk
from regfsck.inventory import UNSTATED, Anomaly, Inventory, Link, Repository
from regfsck.manifest import Descriptor, Manifest, ManifestKind
from regfsck.names import is_upload_id, is_valid_tag, repo_name_problem

DEFAULT_UPLOAD_AGE = timedelta(hours=168)


@dataclass
class FindingSet:
    """Collects findings, merging repeats of the same problem (their affected tags)."""

    _by_key: dict[tuple[str, str | None, str | None, str], Finding] = field(default_factory=dict)

    def add(self, finding: Finding) -> None:
        key = (finding.kind, finding.repo, finding.digest, finding.path)
        old = self._by_key.get(key)
        if old is None:
            self._by_key[key] = finding
        elif finding.affected_tags:
            merged = tuple(sorted(set(old.affected_tags) | set(finding.affected_tags)))
            self._by_key[key] = Finding(**{**old.__dict__, "affected_tags": merged})

    def extend(self, findings: Iterable[Finding]) -> None:
        for finding in findings:
            self.add(finding)

    def findings(self) -> list[Finding]:
        return list(self._by_key.values())


def valid_revisions(repo: Repository) -> set[str]:
    """Digests this repository can serve as manifests (revision link valid and matching)."""
    revisions = repo.revisions  # a plain link holds the digest its path names
    return {*revisions.plain(), *(d for d, link in revisions.odd().items() if link.target == d)}


def linked_layers(repo: Repository) -> set[str]:
    """Blob digests this repository's `_layers` links make readable (content wins)."""
    return {link.target for link in repo.layers.values() if link.target is not None}


class TreeChecker:
    """Runs the structural checks of verify over one inventory."""

    def __init__(self, inventory: Inventory, store: ManifestStore, *,
                 now: datetime, upload_age: timedelta = DEFAULT_UPLOAD_AGE,
                 blocking_only: bool = False) -> None:
        self.inv = inventory
        self.store = store
        self.now = now
        self.upload_age = upload_age
        # gc's plan keeps only the findings that block it (`findings.blocks_gc`): the
        # checks that can find nothing else are skipped (a manifest's references, layer
        # links, uploads, blob sizes: most of the checking time on a big tree). Every
        # finding it still makes is the one the full checker makes, affected tags and all
        # (tests/test_checks_blocking.py holds the two to that).
        self.blocking_only = blocking_only
        self.out = FindingSet()
        self._size_checked: set[tuple[str, int]] = set()
        self._cycle_free: set[str] = set()  # manifests from which no index cycle is reachable
        self._empty_dirs: set[str] | None = None  # filled on first use

    @property
    def empty_dirs(self) -> set[str]:
        if self._empty_dirs is None:
            self._empty_dirs = {a.path for a in self.inv.anomalies if a.kind == "empty_dir"}
        return self._empty_dirs

    def run(self, repos: set[str] | None = None) -> list[Finding]:
        walked = len(self.inv.anomalies)
        self._add_anomalies(self.inv.anomalies[:walked], repos)
        if repos is None and not self.blocking_only:
            self._check_blobs()
        chosen = [repo for name, repo in sorted(self.inv.repositories.items())
                  if repos is None or name in repos]
        self.store.preload(d for repo in chosen for d in repo.revisions)  # reads in parallel
        for repo in chosen:
            self._check_repository(repo)
        # What a manifest read here found inside a blob directory the walk only listed
        # (gc's dry run: `scanner.settle_blobs`).
        self._add_anomalies(self.inv.anomalies[walked:], repos)
        return self.out.findings()

    def _add_anomalies(self, anomalies: list[Anomaly], repos: set[str] | None) -> None:
        for anomaly in anomalies:
            if repos is not None and anomaly.repo is not None and anomaly.repo not in repos:
                continue
            self.out.add(make_finding(anomaly.kind, anomaly.path, anomaly.detail,
                                      repo=anomaly.repo, digest=anomaly.digest, tag=anomaly.tag))

    # -- blobs -----------------------------------------------------------------
    def _check_blobs(self) -> None:
        for digest, blob in self.inv.blobs.items():
            if blob.size == 0 and digest != EMPTY_SHA256:
                self.out.add(make_finding("blob_empty", blob.path,
                                          "zero-byte blob data (truncated write?)", digest=digest))

    def _linked(self, repo: Repository, digest: str, layers: set[str]) -> bool:
        """Readable through `repo`: a `_layers` link named by `digest` naming a stored blob
        (an alias: `_layers/sha512/<hex>/link` holding the canonical sha256), or one whose
        content is `digest`."""
        link = repo.layers.get(digest)
        if link is not None and link.target is not None and link.target in self.inv.blobs:
            return True
        return digest in layers

    def _child_not_served(self, repo: Repository, index: str, ref: Descriptor,
                          tags: tuple[str, ...]) -> None:
        """An index child this repository cannot serve. A damaged revision link is link
        damage (`child_not_in_repo`, an error repair rewrites); no link at all is what a
        DELETE of the child through the API leaves (distribution's own
        TestDeleteManifestIndexWithDanglingReferences), or a collector: a deliberate state,
        reported as what it means (`index_child_deleted`, that platform cannot be pulled)
        and never undone by repair unless asked (`--restore-deleted`)."""
        path = layout.revision_link(repo.name, ref.digest)
        if ref.digest in repo.revisions:
            self.out.add(make_finding(
                "child_not_in_repo", path,
                f"child manifest {ref.digest} of index {index} has no valid revision link "
                "in this repository", repo=repo.name, digest=ref.digest, affected_tags=tags))
            return
        platform = f" (platform {ref.platform})" if ref.platform else ""
        trace = (" its empty revision directory is what a DELETE through the API leaves;"
                 if layout.revision_dir(repo.name, ref.digest) in self.empty_dirs else "")
        self.out.add(make_finding(
            "index_child_deleted", path,
            f"index {index} lists child {ref.digest}{platform}, which is not in this "
            f"repository:{trace} pulling that platform fails (manifest unknown); "
            "`repair --restore-deleted` brings it back while its blob exists",
            repo=repo.name, digest=ref.digest, affected_tags=tags))

    def _check_size(self, ref: Descriptor, stored: str, manifest_digest: str, repo: str) -> None:
        blob = self.inv.blobs.get(stored)
        if blob is None or ref.size is None or blob.size in (ref.size, UNSTATED):
            return
        if (ref.digest, ref.size) in self._size_checked:
            return
        self._size_checked.add((ref.digest, ref.size))
        self.out.add(make_finding(
            "blob_size_mismatch", blob.path,
            f"blob is {blob.size} bytes but manifest {manifest_digest} says {ref.size}",
            repo=repo, digest=ref.digest))

    # -- repositories ----------------------------------------------------------
    def _check_repository(self, repo: Repository) -> None:
        problem = repo_name_problem(repo.name)
        if problem:
            self.out.add(make_finding("repo_bad_name", repo.path, problem, repo=repo.name))
        if repo.has_manifests and not repo.has_layers:
            self.out.add(make_finding(
                "repo_no_layers", repo.path,
                "no _layers directory: registry 2.8's catalog and GC do not see this repository",
                repo=repo.name))
        reach = _TagReach(self.store, repo)
        self._check_revisions(repo, reach)
        if not self.blocking_only:
            self._check_layer_links(repo, reach)
        self._check_tags(repo)
        if not self.blocking_only:
            self._check_uploads(repo)

    def _link_content(self, link: Link, repo: str, tag: str | None = None,
                      expected: str | None = None) -> bool:
        """Report invalid or mismatching link content; True when the link is usable."""
        if link.target is None:
            shown = f" (content {quote_bytes(link.raw[:80])})" if link.raw is not None else ""
            self.out.add(make_finding("link_invalid", link.path, f"{link.error}{shown}",
                                      repo=repo, tag=tag, digest=expected))
            return False
        if expected is not None and link.target != expected:
            self.out.add(make_finding("link_mismatch", link.path,
                                      f"link holds {link.target}, its path says {expected}",
                                      repo=repo, tag=tag, digest=expected))
            return False
        return True

    def _check_revisions(self, repo: Repository, reach: _TagReach) -> None:
        serving = set() if self.blocking_only else valid_revisions(repo)
        layers = set() if self.blocking_only else linked_layers(repo)
        for digest, link in sorted(repo.revisions.items()):
            if not self._link_content(link, repo.name, expected=digest):
                continue
            # Of a loadable manifest, only bad descriptors block gc: the blocking-only
            # checks ask no more than that (`loadable`: no unpacking of packed manifests).
            loaded = self.store.loadable(digest) if self.blocking_only else self.store.load(digest)
            if isinstance(loaded, Unloadable):
                kind = loaded.kind if loaded.kind != "blob_unreadable" else "revision_not_manifest"
                path = link.path if kind == "revision_blob_missing" else layout.blob_data(digest)
                self.out.add(make_finding(kind, path, f"manifest {digest}: {loaded.message}",
                                          repo=repo.name, digest=digest,
                                          affected_tags=reach.tags(digest)))
            elif isinstance(loaded, Manifest):
                self._check_manifest(repo, digest, loaded, serving, layers, reach)
            else:  # its problems (blocking-only)
                self._bad_descriptors(repo, digest, loaded, reach)

    def _bad_descriptors(self, repo: Repository, digest: str, problems: tuple[str, ...],
                         reach: _TagReach) -> None:
        for problem in problems:
            self.out.add(make_finding("manifest_bad_descriptor", layout.blob_data(digest),
                                      f"manifest {digest}: {problem}", repo=repo.name,
                                      digest=digest, affected_tags=reach.tags(digest)))

    def _check_manifest(self, repo: Repository, digest: str, manifest: Manifest,
                        serving: set[str], layers: set[str], reach: _TagReach) -> None:
        """A loaded manifest's own findings. The tags each names (`reach`) are walked only
        once a finding needs them: on a healthy repository, never."""
        where = layout.blob_data(digest)
        if manifest.kind is ManifestKind.SCHEMA1:
            self.out.add(make_finding("manifest_schema1", where,
                                      "schema1 manifest: registry 3.x cannot serve or collect it",
                                      repo=repo.name, digest=digest, affected_tags=reach.tags(digest)))
        self._bad_descriptors(repo, digest, manifest.problems, reach)
        for edge in self.store.reach.edges(digest):
            ref = edge.descriptor
            if edge.blob is None:
                if not edge.optional:  # a foreign layer's bytes may be elsewhere (`urls`)
                    self.out.add(make_finding(
                        "reference_missing", layout.blob_data(ref.digest),
                        f"{ref.role} {ref.digest} of manifest {digest} does not exist",
                        repo=repo.name, digest=ref.digest, affected_tags=reach.tags(digest)))
                continue
            self._check_size(ref, edge.blob, digest, repo.name)
            if ref.role == "manifest":
                if ref.digest not in serving:
                    self._child_not_served(repo, digest, ref, reach.tags(digest))
            elif not edge.optional and not self._linked(repo, ref.digest, layers):
                self.out.add(make_finding(
                    "reference_not_linked", layout.layer_link(repo.name, ref.digest),
                    f"{ref.role} {ref.digest} of manifest {digest} exists but is not linked in "
                    "this repository (the registry answers 'blob unknown')",
                    repo=repo.name, digest=ref.digest, affected_tags=reach.tags(digest)))
        if manifest.subject is not None and manifest.subject.digest not in serving:
            self.out.add(make_finding(
                "subject_missing", layout.revision_link(repo.name, digest),
                f"referrer {digest} refers to subject {manifest.subject.digest}, which is not "
                "in this repository", repo=repo.name, digest=digest, affected_tags=reach.tags(digest)))
        if manifest.children:
            cycle = find_cycle(self.store, digest, self._cycle_free)
            if cycle is not None:
                self.out.add(make_finding(
                    "manifest_cycle", where, "index cycle: " + " -> ".join(cycle),
                    repo=repo.name, digest=digest, affected_tags=reach.tags(digest)))

    def _check_layer_links(self, repo: Repository, reach: _TagReach) -> None:
        for digest, link in sorted(repo.layers.items()):
            if link.target is None:
                self._link_content(link, repo.name, expected=digest)
                continue
            if link.target != digest:
                if digest.startswith("sha256:"):
                    self._link_content(link, repo.name, expected=digest)
                    continue
                self.out.add(make_finding("link_alias", link.path,
                                          f"alias of {link.target}", repo=repo.name,
                                          digest=digest))
            if link.target not in self.inv.blobs:
                tags = reach.tags(link.target)
                self.out.add(make_finding(
                    "layer_link_dangling", link.path,
                    f"_layers link to {link.target}, which does not exist",
                    repo=repo.name, digest=link.target, affected_tags=tags))

    def _check_tags(self, repo: Repository) -> None:
        serving = valid_revisions(repo)
        for name, tag in sorted(repo.tags.items()):
            if not is_valid_tag(name):
                self.out.add(make_finding("tag_bad_name", tag.path,
                                          "tag name breaks the tag grammar", repo=repo.name,
                                          tag=name))
            for digest, link in sorted(tag.index.items()):
                if self._link_content(link, repo.name, tag=name, expected=digest) and (
                        digest not in serving):
                    self.out.add(make_finding(
                        "tag_index_orphan", link.path,
                        f"tag history names {digest}, which has no revision any more",
                        repo=repo.name, tag=name, digest=digest))
            if tag.current is None:
                self.out.add(make_finding(
                    "tag_no_current", layout.tag_current_link(repo.name, name),
                    "tag has no current/link: listed by the registry but cannot be pulled",
                    repo=repo.name, tag=name, affected_tags=(name,)))
                continue
            if not self._link_content(tag.current, repo.name, tag=name):
                continue
            target = tag.current.target
            assert target is not None
            if target not in serving:
                self.out.add(make_finding(
                    "tag_revision_missing", tag.current.path,
                    f"tag points at {target}, which has no revision link in this repository",
                    repo=repo.name, tag=name, digest=target, affected_tags=(name,)))
            elif target not in self.inv.blobs:
                self.out.add(make_finding(
                    "tag_blob_missing", tag.current.path,
                    f"tag points at {target}, whose manifest blob is missing",
                    repo=repo.name, tag=name, digest=target, affected_tags=(name,)))
            if tag.index and target not in tag.index:
                self.out.add(make_finding(
                    "tag_index_missing_current", layout.tag_dir(repo.name, name),
                    f"current digest {target} is not in the tag's index/", repo=repo.name,
                    tag=name, digest=target))

    def _check_uploads(self, repo: Repository) -> None:
        for upload in repo.uploads:
            if not is_upload_id(upload.id):
                self.out.add(make_finding("upload_bad_name", upload.path,
                                          "upload directory name is not a UUID (registry ignores "
                                          "it)", repo=repo.name))
                continue
            if upload.started_at is None:
                why = "no startedat" if upload.startedat_raw is None else "unparsable startedat"
                self.out.add(make_finding(
                    "upload_no_startedat", upload.path,
                    f"{why}: the registry will never purge this upload ({upload.size} bytes)",
                    repo=repo.name))
            elif self.now - upload.started_at > self.upload_age:
                self.out.add(make_finding(
                    "upload_stale", upload.path,
                    f"upload started {upload.started_at.isoformat()} ({upload.size} bytes)",
                    repo=repo.name))


class _TagReach:
    """For every digest a tag of one repository needs, the tags that need it: walked on
    first use (a blocking-only check of a healthy repository never asks)."""

    def __init__(self, store: ManifestStore, repo: Repository) -> None:
        self._store = store
        self._repo = repo
        self._reach: dict[str, set[str]] | None = None

    def tags(self, digest: str) -> tuple[str, ...]:
        if self._reach is None:
            self._reach = {}
            for tag, target in self._repo.tag_targets().items():
                for reached, _, _ in walk(self._store, [target]):
                    self._reach.setdefault(reached, set()).add(tag)
        return tuple(sorted(self._reach.get(digest, ())))


def check_tree(inventory: Inventory, store: ManifestStore, *, now: datetime,
               repos: set[str] | None = None) -> list[Finding]:
    """All structural findings for `inventory` (optionally only some repositories)."""
    return TreeChecker(inventory, store, now=now).run(repos)
