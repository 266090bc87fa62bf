"""The damage machine of the mutation fuzzers (tests/test_fuzz_verify.py, test_fuzz_gc.py):
a hypothesis state machine that damages a private copy of the real sample tree step by
step and, after the damage and at random points between, runs the CLI as an operator
would and checks what test_fuzz_verify.py's docstring lists. test_fuzz_gc.py subclasses
it to run gc --apply instead.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule

from regfsck import layout
from tests.hostile import (
    assert_clean_exit,
    cli_env,
    deep_json,
    index_of,
    padded_manifest,
    remove_tree,
    replace_with,
    sha256_of,
    strict_json,
    watch_opens,
)
from tests.realtools import SampleInfo
from tests.support import V2, cli
from tests.support.snapshot import snapshot

EXAMPLES = int(os.environ.get("REGFSCK_FUZZ_EXAMPLES", "15"))
RUN_TIMEOUT = 45.0
ODD_NAMES = [b"bad\xff\xfe", b"\xc3\x28", b"caf\xe9", b"x" * 255, b"ctl\x01\x1b[2J", b"new\nline",
             b"link.0f1e2d3c.tmp", b"data.tmp", b" ", b"-rf", b"sha256", b"_layers", b"_uploads",
             b"ab", b"0" * 64, b"[/]", b"[bold]x[/x]"]
LINK_JUNK = [b"", b"\n", b"sha256:", b"SHA256:" + b"A" * 64, b"\x00" * 71, b"sha256:" + b"g" * 64,
             b"md5:" + b"0" * 32, b"sha256:" + b"0" * 64 + b"\n", b"\xff\xfe\xfd"]


def tolerant(damage: Callable[..., None]) -> Callable[..., None]:
    """Damage that the current state makes impossible (its parent is now a file...) is skipped."""
    @functools.wraps(damage)
    def apply(self: DamageMachine, **kwargs: Any) -> None:
        try:
            damage(self, **kwargs)
        except (OSError, ValueError) as exc:
            self.log.append(f"({damage.__name__} not applicable: {type(exc).__name__})")
    return apply


def tree_entries(v2: Path) -> list[str]:
    """Every path below v2 (relative, sorted), without following symlinks."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(v2):
        rel = os.path.relpath(dirpath, v2)
        for name in sorted(dirnames + filenames):
            if len(dirpath) + len(name) < 3000:  # leave room below PATH_MAX for the damage
                found.append(name if rel == "." else f"{rel}/{name}")
    return sorted(found)


class DamageMachine(RuleBasedStateMachine):
    """Damages a private copy of the real sample tree; `check` runs the CLI on it."""

    sample: Path
    info: SampleInfo
    prefix: list[str]
    mknod_ok: bool

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="regfsck-fuzz-"))
        self.root = self.tmp / "root"
        shutil.copytree(self.sample, self.root, symlinks=True)
        self.v2 = self.root / V2
        self.outside = self.tmp / "outside"
        self._make_decoy()
        self.dirty = False
        self.log: list[str] = []

    # -- the decoy outside ROOT that symlinks point into --------------------------
    def _make_decoy(self) -> None:
        repo = self.outside / "repo" / "_layers" / "sha256" / ("0" * 64)
        repo.mkdir(parents=True)
        (repo / "link").write_bytes(b"sha256:" + b"0" * 64)
        (self.outside / "data").write_bytes(b"outside-secret")
        (self.outside / "link").write_bytes(self.info.zstd[1].encode())
        os.mkfifo(self.outside / "fifo")

    # -- picking targets ------------------------------------------------------------
    def _pick(self, data: st.DataObject, *, want: str = "any") -> Path | None:
        entries = tree_entries(self.v2)
        if want == "file":
            entries = [e for e in entries if stat.S_ISREG(os.lstat(self.v2 / e).st_mode)]
        elif want == "dir":
            entries = [e for e in entries if stat.S_ISDIR(os.lstat(self.v2 / e).st_mode)]
        elif want == "leaf":
            entries = [e for e in entries if e.rsplit("/", 1)[-1] in ("data", "link", "startedat")]
        if not entries:
            return None
        return self.v2 / data.draw(st.sampled_from(entries), label=f"{want} target")

    def _note(self, what: str, path: Path | None) -> None:
        self.dirty = True
        self.log.append(f"{what} {os.path.relpath(path, self.v2) if path else ''}")

    def _revisions(self) -> list[str]:
        return sorted({d for digests in self.info.revisions.values() for d in digests})

    def _write_blob(self, digest: str, content: bytes) -> None:
        path = self.v2 / layout.blob_data(digest)
        if path.is_symlink() or (path.exists() and not path.is_file()):
            replace_with(path, "file", data=content)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)

    # -- damage -----------------------------------------------------------------------
    @rule(data=st.data(), content=st.one_of(st.sampled_from(LINK_JUNK), st.binary(max_size=200)))
    @tolerant
    def garble_file(self, data: st.DataObject, content: bytes) -> None:
        path = self._pick(data, want="file")
        if path is not None:
            path.write_bytes(content)
        self._note("garble", path)

    @rule(data=st.data(), keep=st.floats(min_value=0.0, max_value=0.99))
    @tolerant
    def truncate_file(self, data: st.DataObject, keep: float) -> None:
        path = self._pick(data, want="file")
        if path is not None:
            os.truncate(path, int(path.stat().st_size * keep))
        self._note("truncate", path)

    @rule(data=st.data())
    @tolerant
    def delete_entry(self, data: st.DataObject) -> None:
        path = self._pick(data)
        if path is not None:
            if path.is_dir() and not path.is_symlink():
                remove_tree(path)
            else:
                path.unlink()
        self._note("delete", path)

    @rule(data=st.data(), inner=st.booleans())
    @tolerant
    def file_to_dir(self, data: st.DataObject, inner: bool) -> None:
        path = self._pick(data, want="file")
        if path is not None:
            replace_with(path, "dir")
            if inner:
                (path / "data").write_bytes(b"inner")
        self._note("file->dir", path)

    @rule(data=st.data(), content=st.binary(max_size=80))
    @tolerant
    def dir_to_file(self, data: st.DataObject, content: bytes) -> None:
        path = self._pick(data, want="dir")
        if path is not None:
            replace_with(path, "file", data=content)
        self._note("dir->file", path)

    @rule(data=st.data(), dest=st.sampled_from(
        ["self", "..", ".", "/dev/zero", "/dev/null", "outside-data", "outside-dir", "outside-fifo",
         "outside-link", "missing", "sibling", "absolute-in-tree"]))
    @tolerant
    def symlink(self, data: st.DataObject, dest: str) -> None:
        path = self._pick(data)
        if path is None:
            return
        where = {
            "self": path.name, "outside-data": str(self.outside / "data"),
            "outside-dir": str(self.outside / "repo"), "outside-fifo": str(self.outside / "fifo"),
            "outside-link": str(self.outside / "link"), "missing": str(self.tmp / "nowhere"),
            "sibling": "../" + path.name, "absolute-in-tree": str(self.v2 / "blobs"),
        }.get(dest, dest)
        replace_with(path, "symlink", target=where)
        self._note(f"symlink->{dest}", path)

    @rule(data=st.data(), kind=st.sampled_from(["fifo", "chardev"]))
    @tolerant
    def special_file(self, data: st.DataObject, kind: str) -> None:
        if kind == "chardev" and not self.mknod_ok:
            kind = "fifo"
        path = self._pick(data, want="leaf")
        if path is not None:
            replace_with(path, kind)
        self._note(kind, path)

    @rule(data=st.data(), mode=st.sampled_from([0o000, 0o111, 0o444, 0o222, 0o100]))
    @tolerant
    def chmod(self, data: st.DataObject, mode: int) -> None:
        path = self._pick(data)
        if path is not None and not path.is_symlink():
            os.chmod(path, mode)
        self._note(f"chmod {mode:o}", path)

    @rule(data=st.data(), name=st.sampled_from(ODD_NAMES), as_dir=st.booleans())
    @tolerant
    def odd_name(self, data: st.DataObject, name: bytes, as_dir: bool) -> None:
        parent = self._pick(data, want="dir") or self.v2
        target = os.path.join(os.fsencode(parent), name)
        if os.path.lexists(target):
            return
        if as_dir:
            os.mkdir(target)
            os.mkdir(os.path.join(target, b"current"))
        else:
            with open(target, "wb") as fh:
                fh.write(b"sha256:" + b"1" * 64)
        self._note(f"odd name {name[:20]!r}", parent)

    @rule(data=st.data())
    @tolerant
    def beyond_path_max(self, data: st.DataObject) -> None:
        parent = self._pick(data, want="dir") or self.v2
        fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for _ in range(20):
                name = "d" * 250
                if not os.path.lexists(os.path.join(f"/proc/self/fd/{fd}", name)):
                    os.mkdir(name, dir_fd=fd)
                next_fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
                os.close(fd)
                fd = next_fd
            os.mkdir("_layers", dir_fd=fd) if not os.path.lexists(
                f"/proc/self/fd/{fd}/_layers") else None
        finally:
            os.close(fd)
        self._note("beyond PATH_MAX", parent)

    @rule(data=st.data(), shape=st.sampled_from(["deep", "huge", "self-index", "wide", "array",
                                                 "not-utf8", "bad-descriptors"]),
          depth=st.sampled_from([65, 200, 5000, 200_000]))
    @tolerant
    def hostile_manifest(self, data: st.DataObject, shape: str, depth: int) -> None:
        """Replace the bytes of a manifest the tree uses (a revision's blob)."""
        digest = data.draw(st.sampled_from(self._revisions()), label="manifest")
        content = {
            "deep": deep_json(depth),
            "huge": padded_manifest(4 * 1024 * 1024 + 1 + depth),
            "self-index": index_of(digest),
            "wide": index_of(*[f"sha256:{i:064x}" for i in range(depth % 20000)]),
            "array": b"[" + b"1," * depth + b"1]",
            "not-utf8": b'{"schemaVersion":2,"mediaType":"\xff\xfe"}',
            "bad-descriptors": json.dumps({
                "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"digest": "sha256:../../etc/passwd", "size": -1},
                "layers": [None, 7, {"digest": "/etc/passwd"}, {"digest": digest, "size": 1e300},
                           {"digest": "sha256:" + "0" * 64, "size": 1, "urls": ["file:///etc"]}],
                "subject": {"digest": digest}}).encode(),
        }[shape]
        self._write_blob(digest, content)
        self._note(f"manifest {shape}", self.v2 / layout.blob_data(digest))

    @rule(data=st.data())
    @tolerant
    def manifest_cycle(self, data: st.DataObject) -> None:
        """Two (or more) manifests rewritten into indexes that list each other."""
        digests = data.draw(st.lists(st.sampled_from(self._revisions()), min_size=2, max_size=4,
                                     unique=True), label="cycle")
        for here, there in zip(digests, digests[1:] + digests[:1], strict=True):
            self._write_blob(here, index_of(there))
        self._note(f"cycle of {len(digests)}", None)

    @rule(data=st.data(), new=st.booleans())
    @tolerant
    def retarget_tag(self, data: st.DataObject, new: bool) -> None:
        """Point a tag at another manifest, or at a new hostile one with a revision link."""
        repo = data.draw(st.sampled_from(sorted(self.info.tags)), label="repo")
        tag = data.draw(st.sampled_from(sorted(self.info.tags[repo])), label="tag")
        if new:
            body = index_of(sha256_of(b"placeholder"), *self._revisions())
            digest = sha256_of(body)
            self._write_blob(digest, body)
            link = self.v2 / layout.revision_link(repo, digest)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.write_bytes(digest.encode())
        else:
            digest = data.draw(st.sampled_from(self._revisions()), label="digest")
        current = self.v2 / layout.tag_current_link(repo, tag)
        if current.parent.is_dir() and not current.parent.is_symlink():
            if current.is_symlink() or (current.exists() and not current.is_file()):
                replace_with(current, "file")
            current.write_bytes(digest.encode())
        self._note(f"retarget {repo}:{tag}", current)

    # -- the property ---------------------------------------------------------------
    @precondition(lambda self: self.dirty)
    @rule(other=st.sampled_from(["scan --json", "verify", "scan"]))
    def check(self, other: str = "scan --json") -> None:
        """verify --json, and one other run alongside it (two cores, two processes)."""
        self.dirty = False
        before = snapshot(self.root)
        runs = {"verify --json": ["verify", str(self.root), "--json"],
                other: [*other.split(" ", 1)[:1], str(self.root), *other.split(" ")[1:]]}
        with watch_opens(self.outside) as watch:
            procs = {name: subprocess.Popen(cli.command(*args, prefix=self.prefix),
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                            stdin=subprocess.DEVNULL, env=cli_env())
                     for name, args in runs.items()}
            results: dict[str, subprocess.CompletedProcess[bytes]] = {}
            try:
                for name, proc in procs.items():
                    try:
                        out, err = proc.communicate(timeout=RUN_TIMEOUT)
                    except subprocess.TimeoutExpired:
                        pytest.fail(f"{name} did not finish in {RUN_TIMEOUT}s after: {self.log}")
                    results[name] = subprocess.CompletedProcess(runs[name], proc.returncode, out, err)
            finally:
                for proc in procs.values():
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait()
            events = watch.events()
        context = f" after damage {self.log}"
        assert events == [], f"opened outside ROOT: {events[:5]}{context}"
        assert_clean_exit(results["verify --json"], (0, 1), "verify --json" + context)
        doc = strict_json(results["verify --json"].stdout)
        code = results["verify --json"].returncode
        assert code == (1 if doc["summary"]["errors"] else 0), context
        assert set(doc) >= {"findings", "summary"}
        if other.startswith("scan"):
            assert_clean_exit(results[other], (0,), other + context)
        else:
            assert_clean_exit(results[other], (code,), other + context)
        if other.endswith("--json"):
            strict_json(results[other].stdout)
        assert snapshot(self.root) == before, "a read-only command changed the tree" + context

    def teardown(self) -> None:
        try:
            if self.dirty:
                self.check()
        finally:
            remove_tree(self.tmp)


def fuzz_settings() -> settings:
    return settings(max_examples=EXAMPLES, stateful_step_count=8, deadline=None,
                    derandomize=not os.environ.get("REGFSCK_FUZZ_RANDOM"), database=None,
                    suppress_health_check=list(HealthCheck), print_blob=True)
