"""Mutation fuzzing of `gc --apply`: random damage to a tree the real registry wrote, then a
real collection. For every damaged tree, gc either

* refuses: exit 3, the tree under docker/ untouched (every byte, mode and mtime), or
* collects (exit 0; or exit 3 after a failing move, everything done so far journaled) and
  every image that was whole before gc is still whole after it: each tag, and (without
  --delete-untagged) each manifest revision, judged by an oracle that reads the files the
  way the registry serves them (plain reads and hashlib, not regfsck's code);

and in both cases `undo` puts every path and byte back. The oracle itself is checked
against the real registry: what it calls whole, `skopeo copy` pulls.

The damage rules are those of test_fuzz_verify's state machine; gc runs, like verify
there, without the capabilities that bypass permission bits, so unreadable damage is real.
Seeded and bounded like that test (REGFSCK_FUZZ_EXAMPLES, default 15 here).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import precondition, rule, run_state_machine_as_test

from regfsck import layout
from tests.hostile import (
    assert_clean_exit,
    can_mknod,
    intact_images,
    remove_tree,
    replace_with,
    run_cli,
    sha256_of,
    strict_json,
    unprivileged_prefix,
    why_not_pullable,
)
from tests.realtools import RealRegistry, SampleInfo, skopeo_copy
from tests.support import V2
from tests.support.damage import DamageMachine, fuzz_settings
from tests.support.snapshot import content_snapshot, registry_snapshot

EXAMPLES = int(os.environ.get("REGFSCK_FUZZ_EXAMPLES", "15"))


def image_refs(info: SampleInfo, *, untagged_too: bool) -> list[tuple[str, str]]:
    refs = [(repo, tag) for repo, tags in info.tags.items() for tag in tags]
    if untagged_too:
        refs += [(repo, "@" + d) for repo, digests in info.revisions.items() for d in digests]
    return sorted(refs)


def quarantine_runs(root: Path) -> list[str]:
    runs = root / "regfsck-quarantine"
    return sorted(p.name for p in runs.iterdir()) if runs.is_dir() else []


def gc_property(machine: DamageMachine, delete_untagged: bool) -> None:
    """Run gc --apply on the machine's damaged tree and check what the module docstring says."""
    root, prefix = machine.root, machine.prefix
    context = f" after damage {machine.log} (--delete-untagged={delete_untagged})"
    refs = image_refs(machine.info, untagged_too=not delete_untagged)
    whole_before = intact_images(root, refs)
    before = registry_snapshot(root)
    content_before = content_snapshot(root / "docker")
    runs_before = quarantine_runs(root)
    args = ["gc", str(root), "--grace", "0", "--uploads-older-than", "0", "--apply", "--json",
            *(["--delete-untagged"] if delete_untagged else [])]
    result = run_cli(*args, prefix=prefix, timeout=120)
    assert_clean_exit(result, (0, 3), "gc --apply" + context)
    new_runs = [r for r in quarantine_runs(root) if r not in runs_before]
    outcome = "refused" if result.returncode == 3 and not new_runs else (
        "collected" if result.returncode == 0 else "stopped midway")
    event(f"gc {outcome}")
    if os.environ.get("REGFSCK_FUZZ_LOG"):
        with open(os.environ["REGFSCK_FUZZ_LOG"], "a") as log:
            log.write(f"{outcome} {len(whole_before)}/{len(refs)} whole; {machine.log}\n")
    if result.returncode == 3 and not new_runs:
        assert registry_snapshot(root) == before, "gc refused but changed the tree" + context
        assert result.stderr.strip() or result.stdout.strip(), "refusal without a word" + context
        return
    if result.returncode == 0:
        strict_json(result.stdout)
    lost = {ref: why for ref in whole_before if (why := why_not_pullable(root, *ref)) is not None}
    assert not lost, f"gc broke images that were whole: {lost}" + context
    undone = run_cli("undo", str(root), prefix=prefix, timeout=120)
    assert_clean_exit(undone, (0,), "undo" + context)
    assert content_snapshot(root / "docker") == content_before, "undo did not restore" + context
    assert intact_images(root, refs) == whole_before


class GcDamageMachine(DamageMachine):
    """Any damage (most of which gc refuses to collect); checked once, at the end."""

    delete_untagged = False

    @precondition(lambda self: False)
    @rule()
    def check(self) -> None:  # type: ignore[override]
        raise AssertionError("not used: see teardown")

    @rule(untagged=st.booleans())
    def choose_mode(self, untagged: bool) -> None:
        self.delete_untagged = untagged

    def teardown(self) -> None:
        try:
            if self.dirty:
                self.dirty = False
                gc_property(self, self.delete_untagged)
        finally:
            super().teardown()


class GentleGcMachine(GcDamageMachine):
    """Only damage gc is meant to collect around (orphans, corrupt unreferenced blobs,
    dangling links, junk, stray uploads, removed tags), so that it really collects."""

    def _orphans(self) -> list[str]:
        return sorted(set(self.info.unreferenced_blobs) | set(getattr(self, "added", [])))

    @rule(count=st.integers(1, 40), sizes=st.sampled_from([0, 10, 5000]))
    def add_orphans(self, count: int, sizes: int) -> None:
        self.added = getattr(self, "added", [])
        for i in range(count):
            data = f"orphan {len(self.added)} {i}".encode() + b"x" * sizes
            digest = sha256_of(data)
            path = self.v2 / layout.blob_data(digest)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            self.added.append(digest)
        self._note(f"{count} orphans", None)

    @rule(data=st.data(), how=st.sampled_from(["garble", "truncate", "delete", "dir", "empty-dir"]))
    def damage_an_orphan(self, data: st.DataObject, how: str) -> None:
        digest = data.draw(st.sampled_from(self._orphans()), label="orphan")
        path = self.v2 / layout.blob_data(digest)
        if not path.is_file() or path.is_symlink():
            return
        if how == "garble":
            path.write_bytes(b"not what the name says")
        elif how == "truncate":
            os.truncate(path, path.stat().st_size // 2)
        elif how == "delete":
            path.unlink()
        elif how == "dir":
            replace_with(path, "dir")
        else:
            path.unlink()
            path.parent.rmdir()
            path.parent.mkdir()
        self._note(f"orphan {how}", path)

    @rule(data=st.data(), towards=st.sampled_from(["missing", "orphan"]))
    def dangling_layer_link(self, data: st.DataObject, towards: str) -> None:
        repo = data.draw(st.sampled_from(sorted(self.info.tags)), label="repo")
        digest = (f"sha256:{len(self.log):064x}" if towards == "missing"
                  else data.draw(st.sampled_from(self._orphans()), label="orphan"))
        link = self.v2 / layout.layer_link(repo, digest)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.write_bytes(digest.encode())
        self._note(f"layer link to {towards}", link)

    @rule(data=st.data(), startedat=st.sampled_from([None, b"2020-01-01T00:00:00Z", b"junk"]),
          with_data=st.booleans())
    def stray_upload(self, data: st.DataObject, startedat: bytes | None, with_data: bool) -> None:
        repo = data.draw(st.sampled_from(sorted(self.info.tags)), label="repo")
        upload = self.v2 / layout.upload_dir(repo, f"{len(self.log):08x}-0000-4000-8000-000000000000")
        upload.mkdir(parents=True, exist_ok=True)
        if startedat is not None:
            (upload / "startedat").write_bytes(startedat)
        if with_data:
            (upload / "data").write_bytes(b"partial upload")
        self._note("stray upload", upload)

    @rule(data=st.data())
    def remove_a_tag(self, data: st.DataObject) -> None:
        repo = data.draw(st.sampled_from(sorted(self.info.tags)), label="repo")
        tag = data.draw(st.sampled_from(sorted(self.info.tags[repo])), label="tag")
        path = self.v2 / layout.tag_dir(repo, tag)
        if path.is_dir() and not path.is_symlink():
            remove_tree(path)
        self._note("tag removed", path)

    @rule(data=st.data(), name=st.sampled_from(["link.0f1e2d3c.tmp", "data.tmp", ".DS_Store"]))
    def leftover_file(self, data: st.DataObject, name: str) -> None:
        parent = self._pick(data, want="dir") or self.v2
        (parent / name).write_bytes(b"leftover")
        self._note(f"leftover {name}", parent)


def _disabled(self: DamageMachine) -> None:
    """An inherited damage rule that the gentle machine never runs."""


for _name in ("garble_file", "truncate_file", "delete_entry", "file_to_dir", "dir_to_file", "symlink",
              "special_file", "chmod", "odd_name", "beyond_path_max", "hostile_manifest",
              "manifest_cycle", "retarget_tag"):
    setattr(GentleGcMachine, _name, precondition(lambda self: False)(rule()(_disabled)))


def configure(machine: type[DamageMachine], real_sample: tuple[Path, SampleInfo], tmp_path: Path) -> None:
    prefix = unprivileged_prefix()
    machine.sample, machine.info = real_sample
    machine.prefix = prefix if prefix is not None else []
    machine.mknod_ok = can_mknod(tmp_path)


def test_gc_apply_on_any_damage_refuses_or_keeps_every_whole_image(
        real_sample: tuple[Path, SampleInfo], tmp_path: Path) -> None:
    configure(GcDamageMachine, real_sample, tmp_path)
    run_state_machine_as_test(GcDamageMachine, settings=settings(
        fuzz_settings(), max_examples=max(1, EXAMPLES * 2 // 3), stateful_step_count=6))


def test_gc_apply_collects_around_damage_and_keeps_every_whole_image(
        real_sample: tuple[Path, SampleInfo], tmp_path: Path) -> None:
    configure(GentleGcMachine, real_sample, tmp_path)
    run_state_machine_as_test(GentleGcMachine, settings=settings(
        fuzz_settings(), max_examples=EXAMPLES, stateful_step_count=6))


def test_oracle_agrees_with_the_real_registry(sample_root: Path, sample_info: SampleInfo,
                                              tmp_path: Path) -> None:
    """What `why_not_pullable` calls whole, the real registry serves in full (skopeo copy
    --all verifies every digest); what it calls broken here, the registry cannot serve."""
    v2 = sample_root / V2
    broken = {
        ("a/b", "latest"): lambda: (v2 / layout.blob_data(sample_info.blobs["layer/a-b"])).unlink(),
        ("compress/zstd", "latest"): lambda: (v2 / layout.layer_link(
            sample_info.zstd[0], sample_info.zstd[2])).unlink(),
        ("multi/oci", "latest"): lambda: (v2 / layout.revision_link(
            "multi/oci", sample_info.index_children[sample_info.oci_index[2]][0])).unlink(),
    }
    for damage in broken.values():
        damage()
    refs = image_refs(sample_info, untagged_too=False)
    whole = intact_images(sample_root, refs)
    assert whole == set(refs) - set(broken), {r: why_not_pullable(sample_root, *r) for r in refs}
    with RealRegistry(sample_root) as registry:
        for n, (repo, tag) in enumerate(refs):
            dest = f"dir:{tmp_path / str(n)}"
            source = f"docker://{registry.host}/{repo}:{tag}"
            if (repo, tag) in whole:
                skopeo_copy(source, dest, "--all")
            else:
                with pytest.raises(Exception, match="exited"):
                    skopeo_copy(source, dest, "--all")


def test_gc_on_damage_it_cannot_judge_refuses_and_touches_nothing(sample_root: Path,
                                                                 sample_info: SampleInfo) -> None:
    """The cases the issue names: an unreadable tag directory, an unparsable manifest, a
    bad tag link. Marking would be unreliable: refuse, exit 3, say what blocks."""
    v2 = sample_root / V2
    (v2 / layout.tag_current_link("a/b/c", "latest")).write_bytes(b"sha256:nothex\n")
    (v2 / layout.blob_data(sample_info.tags["a/b"]["latest"])).write_bytes(b"{not json")
    before = registry_snapshot(sample_root)
    for extra in ([], ["--delete-untagged"]):
        result = run_cli("gc", str(sample_root), "--grace", "0", "--apply", "--json", *extra)
        assert_clean_exit(result, (3,), "gc --apply on a damaged tree")
        assert registry_snapshot(sample_root) == before
        plan = strict_json(result.stdout)
        assert plan["applied"] is False
    assert json.dumps(plan).count("link_invalid") + json.dumps(plan).count("manifest_invalid_json") >= 1


def test_gc_with_unreadable_directories_keeps_every_whole_image(sample_root: Path,
                                                                sample_info: SampleInfo) -> None:
    """A directory regfsck cannot read (but the registry, running as another user, can):
    gc must not take what it cannot see for missing. The oracle reads as root."""
    prefix = unprivileged_prefix()
    if prefix is None:
        pytest.skip("cannot run without the capabilities that bypass permission bits")
    v2 = sample_root / V2
    base_layer = sample_info.shared_layers[0]
    fanout = v2 / layout.blob_dir(base_layer).rsplit("/", 1)[0]
    tags_dir = v2 / layout.tags_dir("library/base")
    refs = image_refs(sample_info, untagged_too=False)
    whole_before = intact_images(sample_root, refs)
    os.chmod(fanout, 0)
    os.chmod(tags_dir, 0)
    try:
        for extra in ([], ["--delete-untagged"]):
            result = run_cli("gc", str(sample_root), "--grace", "0", "--uploads-older-than", "0",
                             "--apply", *extra, prefix=prefix)
            assert_clean_exit(result, (0, 3), "gc --apply with unreadable directories")
    finally:
        os.chmod(fanout, 0o755)
        os.chmod(tags_dir, 0o755)
    assert intact_images(sample_root, refs) == whole_before
