"""Operator sequences: rm / gc / import / repair / undo / purge in random order, with pushes
through the real registry in between (issue 10).

After every step, every tag that was pullable and that no regfsck command was asked to
remove must still be pullable from the real registry (skopeo copy checks every digest);
an undo either succeeds or refuses with exit 3 leaving no run stuck. When no push and no
purge happened, undoing every run, newest first or in a drawn order (refused undos tried
again after the others), must restore the original tree byte for byte (contents). Seeded and small by default
(CI); `REGFSCK_FUZZ_SEQ_EXAMPLES=50` explores more, and `REGFSCK_FUZZ_RANDOM=1` draws new
examples.
"""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests import realtools
from tests.hostile import (
    assert_clean_exit,
    run_cli,
    strict_json,
)
from tests.realtools import OCILayoutWriter, RealRegistry, SampleInfo, skopeo_copy
from tests.support.snapshot import content_snapshot

pytestmark = pytest.mark.realtools

EXAMPLES = int(os.environ.get("REGFSCK_FUZZ_SEQ_EXAMPLES", "2"))
STEPS = int(os.environ.get("REGFSCK_FUZZ_SEQ_STEPS", "7"))
# Undo appears three times: the sequences are about what an undo meets after other steps.
OPS = ["push", "push_shared", "rm", "gc", "gc_untagged", "import", "import_again", "repair",
       "undo_newest", "undo_any", "undo_any", "undo_newest", "purge"]


@dataclass
class World:
    root: Path
    scratch: Path
    expected: set[str]  # repo:tag that must be pullable
    by_run: dict[str, tuple[str, list[str]]] = field(default_factory=dict)  # run -> (cmd, tags)
    owner: dict[str, str] = field(default_factory=dict)  # tag -> run id of the import that wrote it
    binary: str = realtools.REGISTRY_BIN  # 2.8, or the v3 binary
    pushed: bool = False
    purged: bool = False
    counter: int = 0

    def layout(self, seed: str, shared: bool) -> OCILayoutWriter:
        self.counter += 1
        writer = OCILayoutWriter(self.scratch / f"layout-{self.counter}")
        layers = [writer.add_layer({f"{seed}.txt": seed.encode() * 40}, "gzip")]
        if shared:
            layers.append(writer.add_layer({"shared.txt": b"shared between pushes and imports"}, "gzip"))
        writer.add_image(layers, tag="1", history=[f"ADD {n}" for n in range(len(layers))])
        return writer


def _json(*args: str, allowed: tuple[int, ...] = (0,)) -> tuple[int, dict[str, object]]:
    result = run_cli(*args, "--json")
    assert_clean_exit(result, allowed, " ".join(args[:2]))
    doc = strict_json(result.stdout) if result.stdout.strip() else {}
    return result.returncode, doc


def _runs(root: Path) -> list[dict[str, object]]:
    return list(_json("runs", str(root))[1]["runs"])  # type: ignore[call-overload]


def _check(world: World, what: str) -> None:
    """Every expected tag is served whole by the real registry; no run is left open."""
    open_runs = [r for r in _runs(world.root) if r["status"] in ("running", "undoing")]
    assert not open_runs, f"after {what}: runs left open {open_runs}"
    if not world.expected:
        return
    dest = world.scratch / "pulled"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir()
    with RealRegistry(world.root, binary=world.binary) as registry:
        for n, ref in enumerate(sorted(world.expected)):
            try:
                skopeo_copy(f"docker://{registry.host}/{ref}", f"dir:{dest / str(n)}", "--all")
            except realtools.RealToolError as exc:
                raise AssertionError(f"after {what}: {ref} is not pullable: {exc}") from exc


def undo_every_run(root: Path, order: random.Random | None = None) -> None:
    """Undo every run not reverted yet: newest first, where each must succeed; or, with
    `order`, in a shuffled order, where an undo may be refused (a newer run to undo
    first) and is tried again after the others. The newest run left can always be
    undone, so each pass must make progress."""
    pending = [str(r["run_id"]) for r in _runs(root) if r["status"] != "reverted"]
    if order is None:
        pending.reverse()
    else:
        order.shuffle(pending)
    while pending:
        refused = [run_id for run_id in pending
                   if _json("undo", str(root), run_id, allowed=(0,) if order is None else (0, 3))[0]]
        assert len(refused) < len(pending), f"no undo of {pending} goes ahead"
        pending = refused


def _step(world: World, op: str, pick: int) -> None:
    root = str(world.root)
    if op in ("push", "push_shared"):
        world.counter += 1
        repo = ["user/a", "user/b", "imp/x"][pick % 3]
        tag = f"p{world.counter}"
        writer = world.layout(f"push-{world.counter}", op == "push_shared")
        desc = next(iter(writer._refs.values()))
        with RealRegistry(world.root, binary=world.binary) as registry:
            registry.push_from_layout(writer, repo, desc, tag)
        world.expected.add(f"{repo}:{tag}")
        world.pushed = True
        if pick % 2:  # also re-push an imported tag: it becomes the user's
            imported = sorted(t for t in world.owner if t in world.expected)
            if imported:
                ref = imported[pick % len(imported)]
                repo2, _, tag2 = ref.rpartition(":")
                with RealRegistry(world.root, binary=world.binary) as registry:
                    registry.push_from_layout(writer, repo2, desc, tag2)
                world.owner.pop(ref, None)
    elif op == "rm":
        candidates = sorted(world.expected)
        if not candidates:
            return
        ref = candidates[pick % len(candidates)]
        code, doc = _json("rm", root, ref, "--apply", allowed=(0, 3))
        if code == 0 and doc.get("run_id"):
            world.expected.discard(ref)
            world.owner.pop(ref, None)
            world.by_run[str(doc["run_id"])] = ("rm", [ref])
    elif op in ("gc", "gc_untagged"):
        extra = ["--delete-untagged"] if op == "gc_untagged" else []
        _json("gc", root, *extra, "--grace", "0s", "--uploads-older-than", "0s", "--apply")
    elif op in ("import", "import_again"):
        repo = ["imp/x", "imp/y", "user/a"][pick % 3]
        writer = world.layout("import" if op == "import_again" else f"imp-{world.counter}", pick % 2 == 0)
        code, doc = _json("import", root, str(writer.path), "--repo", repo, "--apply", allowed=(0, 1, 3))
        event(f"import exit {code}")
        if code == 0 and doc.get("run_id"):
            ref = f"{repo}:1"
            world.expected.add(ref)
            world.owner[ref] = str(doc["run_id"])
            world.by_run[str(doc["run_id"])] = ("import", [ref])
    elif op == "repair":
        _json("repair", root, "--apply", allowed=(0, 1))
    elif op in ("undo_newest", "undo_any"):
        live = [r for r in _runs(world.root) if r["status"] != "reverted"]
        if not live:
            return
        run = live[-1] if op == "undo_newest" else live[pick % len(live)]
        run_id = str(run["run_id"])
        code, _doc = _json("undo", root, run_id, allowed=(0, 3))
        event(f"undo of {run['command']}: {'refused' if code else 'done'}")
        if code != 0:
            return
        command, tags = world.by_run.get(run_id, (str(run["command"]), []))
        if command == "rm":
            world.expected.update(tags)  # the undo brought them back: they must be whole
        elif command == "import":
            for ref in tags:
                if world.owner.get(ref) == run_id:  # still the import's: the undo takes it
                    world.expected.discard(ref)
    elif op == "purge":
        _, doc = _json("purge", root, "--apply")
        event(f"purge kept {len(doc.get('needed') or {})} needed runs")  # type: ignore[arg-type]
        world.purged = True


@pytest.fixture(scope="module", params=["2.8", "v3"])
def registry_binary(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The registry every step pushes through and pulls from: 2.8, then v3.1.1."""
    if request.param == "2.8":
        return realtools.REGISTRY_BIN
    binary = realtools.registry3_binary(tmp_path_factory.mktemp("registry3"))
    if binary is None:
        pytest.skip("registry v3 binary unavailable (../shared/bin/unpack-registry3)")
    return binary


@pytest.mark.skipif(bool(realtools.real_tools_missing()), reason="real registry tools unavailable")
@settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("REGFSCK_FUZZ_RANDOM"),
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, 60)), min_size=3, max_size=STEPS),
       undo_order=st.one_of(st.none(), st.integers(0, 1 << 16)))
def test_operator_sequences_lose_no_image(real_sample: tuple[Path, SampleInfo],
                                          tmp_path_factory: pytest.TempPathFactory,
                                          registry_binary: str,
                                          ops: list[tuple[str, int]],
                                          undo_order: int | None) -> None:
    base = tmp_path_factory.mktemp("seq")
    root = base / "root"
    shutil.copytree(real_sample[0], root, symlinks=True)
    info = real_sample[1]
    # v3 refuses schema1 manifests: those tags are not pullable there to begin with.
    schema1 = (realtools.MT_DOCKER_V1_SIGNED, realtools.MT_DOCKER_V1)
    expected = {f"{repo}:{tag}" for repo, tags in info.tags.items() for tag in tags
                if registry_binary == realtools.REGISTRY_BIN
                or info.media_types.get(tags[tag]) not in schema1}
    world = World(root, base / "scratch", expected, binary=registry_binary)
    world.scratch.mkdir()
    original = content_snapshot(root / "docker")
    for number, (op, pick) in enumerate(ops):
        _step(world, op, pick)
        _check(world, f"step {number} ({op})")
    if world.pushed or world.purged:
        return
    # Newest first, or (undo_order) in any order the undo accepts: the tree comes back.
    undo_every_run(root, None if undo_order is None else random.Random(undo_order))
    assert content_snapshot(root / "docker") == original, "undoing every run did not restore the tree"
