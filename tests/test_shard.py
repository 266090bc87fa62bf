"""`verify --shard K/N` and `regfsck report merge` (issue 12, "Scale beyond one machine").

The oracle is the unsharded run: N shards run as N concurrent `python -m regfsck`
processes on a tree the real registry wrote (and damaged here: flipped bytes, a truncated
blob, a deleted config, a garbage link) must merge into exactly the document one
`verify --json` prints, with its exit status, for N = 1..4, plain, `--deep`, `--strict` and
`--changed-only`. The assignment itself is checked with hypothesis (every digest has
exactly one owner, whatever N), and merges of the wrong set of reports are refused with one
line and exit 2 (3 for a shard that failed or a file that cannot be read).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from regfsck.errors import ExitCode, UsageError
from regfsck.report import SHARD_ENV, Shard, parse_shard, shard_of
from tests import realtools
from tests.support import V2, objectstore
from tests.support.cli import child_env, command, invoke
from tests.support.tree import blob_path, copy_tree, put_blob

# -- the assignment --------------------------------------------------------------------

digests = st.one_of(
    st.binary(min_size=32, max_size=32).map(lambda b: f"sha256:{b.hex()}"),
    st.binary(min_size=64, max_size=64).map(lambda b: f"sha512:{b.hex()}"),
    st.text(min_size=1, max_size=80))  # an odd-named blob directory is owned by one shard too


@given(digest=digests, count=st.integers(min_value=1, max_value=257))
def test_every_digest_has_exactly_one_shard(digest: str, count: int) -> None:
    owners = [k for k in range(count) if Shard(k, count).owns(digest)]
    assert owners == [shard_of(digest, count)]
    assert Shard(owners[0], count).owns_finding(digest)
    assert [k for k in range(count) if Shard(k, count).owns_finding(None)] == [0]


@given(found=st.lists(digests, unique=True, max_size=60), count=st.integers(1, 12),
       seed=st.randoms(use_true_random=False))
def test_shards_partition_any_listing_in_any_order(found: list[str], count: int,
                                                   seed: random.Random) -> None:
    """The union of the shards' parts is the listing, their parts are disjoint, and a
    listing in another order (another machine, S3 pages) gives every digest the same owner."""
    parts = [{d for d in found if Shard(k, count).owns(d)} for k in range(count)]
    assert sum(len(p) for p in parts) == len(found)
    assert set().union(*parts) == set(found)
    shuffled = list(found)
    seed.shuffle(shuffled)
    assert [{d for d in shuffled if Shard(k, count).owns(d)} for k in range(count)] == parts


def test_real_digests_are_spread_evenly() -> None:
    """Blob digests are uniform, so are the shards' shares (10,000 digests, 4 shards)."""
    sizes = [0] * 4
    for i in range(10_000):
        sizes[shard_of("sha256:" + hashlib.sha256(str(i).encode()).hexdigest(), 4)] += 1
    assert all(2250 < n < 2750 for n in sizes), sizes


def test_parse_shard() -> None:
    assert parse_shard("2/4", {}) == Shard(2, 4)
    assert parse_shard("0/1", {}) == Shard(0, 1)
    assert parse_shard("/4", {SHARD_ENV: "3"}) == Shard(3, 4)
    assert parse_shard("1/4", {SHARD_ENV: "3"}) == Shard(1, 4)  # an explicit K wins
    for bad, words in [("4/4", "between 0 and 3"), ("-1/4", "between 0 and 3"),
                       ("1/0", "N must be"), ("a/4", "whole numbers"), ("3", "K/N"),
                       ("/4", SHARD_ENV)]:
        with pytest.raises(UsageError, match=words):
            parse_shard(bad, {})
    with pytest.raises(UsageError, match="between 0 and 1"):
        parse_shard("/2", {SHARD_ENV: "7"})


# -- N processes on a damaged real tree ------------------------------------------------------


def _damage(root: Path, info: realtools.SampleInfo) -> None:
    """Blob damage of every sort hashing and structure can see, spread over the shards."""
    layers = sorted({d for refs in info.references.values() for d in refs[1:]}
                    - set(info.references))
    for digest in layers[:3]:  # flipped bytes: blob_digest_mismatch
        path = blob_path(root, digest)
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    truncated = blob_path(root, layers[3])
    truncated.write_bytes(truncated.read_bytes()[:100])
    config = info.references[info.tags["a/b"]["latest"]][0]
    blob_path(root, config).unlink()  # structure: blob_missing (its digest's shard reports it)
    links = sorted((root / V2 / "repositories/a/b/_layers/sha256").iterdir())
    (links[0] / "link").write_bytes(b"not a digest\n")  # structure: no digest -> shard 0


def _verify_json(root: Path | str, *args: str, env: dict[str, str] | None = None) -> tuple[int, Any]:
    proc = subprocess.run(command("verify", str(root), "--json", "-j", "2", *args),
                          capture_output=True, text=True, env=child_env(env), timeout=600,
                          check=False)
    assert proc.stdout, proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def _sharded(root: Path | str, count: int, reports: Path, *args: str,
             env: dict[str, str] | None = None) -> tuple[list[int], list[Path]]:
    """`count` shards of one run, as concurrent processes, each writing its --output."""
    reports.mkdir(parents=True, exist_ok=True)
    paths = [reports / f"shard-{k}.json" for k in range(count)]
    procs = [subprocess.Popen(command("verify", str(root), "-q", "-j", "1", "--shard",
                                      f"{k}/{count}", "--output", str(paths[k]), *args),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              env=child_env(env))
             for k in range(count)]
    codes = []
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode in (0, 1), err
        codes.append(proc.returncode)
    return codes, paths


def _merge(*paths: Path, extra: tuple[str, ...] = ()) -> tuple[int, Any]:
    result = invoke("report", "merge", "--json", *extra, *map(str, paths))
    return result.returncode, json.loads(result.stdout)


@pytest.fixture(scope="module")
def damaged(real_sample: tuple[Path, realtools.SampleInfo],
            tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = copy_tree(real_sample[0], tmp_path_factory.mktemp("shard") / "root")
    _damage(root, real_sample[1])
    return root


@pytest.mark.parametrize("count", [1, 2, 3, 4])
def test_merged_shards_equal_the_unsharded_run(damaged: Path, tmp_path: Path, count: int) -> None:
    code, whole = _verify_json(damaged)
    assert code == ExitCode.FINDINGS
    kinds = {f["kind"] for f in whole["findings"] if f["severity"] == "error"}
    assert {"blob_digest_mismatch", "blob_missing_data", "link_invalid"} <= kinds, kinds
    codes, paths = _sharded(damaged, count, tmp_path)
    parts = [json.loads(p.read_text()) for p in paths]
    # Every blob hashed by exactly one shard, every finding reported by exactly one.
    assert sum(p["summary"]["blobs_verified"] for p in parts) == whole["summary"]["blobs_total"]
    assert sum(len(p["findings"]) for p in parts) == len(whole["findings"])
    assert {p["shard"]["tree"] for p in parts} == {parts[0]["shard"]["tree"]}
    merge_code, merged = _merge(*reversed(paths))  # any order
    assert merged == whole
    assert merge_code == code == max(codes)


@pytest.mark.parametrize("args", [("--deep",), ("--strict",), ("--no-data",)],
                         ids=lambda a: a[0])
def test_merge_equals_unsharded_with_options(damaged: Path, tmp_path: Path,
                                             args: tuple[str, ...]) -> None:
    code, whole = _verify_json(damaged, *args)
    _, paths = _sharded(damaged, 3, tmp_path, *args)
    merge_code, merged = _merge(*paths)
    assert merged == whole and merge_code == code
    if args == ("--deep",):
        assert whole["deep"]["layers_checked"] == whole["deep"]["layers_total"] > 0


def test_changed_only_with_shards_shares_the_record(real_sample: tuple[Path, realtools.SampleInfo],
                                                    tmp_path: Path) -> None:
    """--changed-only: each shard reads and writes the tree's one record for its own blobs;
    two sharded runs merge to what two unsharded runs on a twin tree report (the second
    re-hashes only the blob changed in between)."""
    twins = [copy_tree(real_sample[0], tmp_path / name) for name in ("one", "sharded")]
    victim = sorted(real_sample[1].all_blobs)[5]

    def change(root: Path) -> None:
        path = blob_path(root, victim)
        path.write_bytes(path.read_bytes())  # same bytes, new mtime/ctime: due again

    for run in range(2):
        code, whole = _verify_json(twins[0], "--changed-only")
        _, paths = _sharded(twins[1], 2, tmp_path / f"run{run}", "--changed-only")
        merge_code, merged = _merge(*paths)
        assert merged == whole and merge_code == code
        if run == 1:
            assert whole["summary"]["hashed_because"] == {"changed": 1}
            assert whole["summary"]["blobs_skipped"] == whole["summary"]["blobs_total"] - 1
        for root in twins:
            change(root)


def test_job_completion_index_is_the_default_k(damaged: Path, tmp_path: Path) -> None:
    """A Kubernetes Indexed Job's pods: `--shard /N` with JOB_COMPLETION_INDEX set."""
    _, whole = _verify_json(damaged)
    paths = []
    for k in range(2):
        out = tmp_path / f"r{k}.json"
        _, doc = _verify_json(damaged, "--shard", "/2", "--output", str(out),
                                 env={**os.environ, SHARD_ENV: str(k)})
        assert doc["shard"]["index"] == k and json.loads(out.read_text()) == doc
        paths.append(out)
    assert _merge(*paths)[1] == whole
    result = invoke("verify", str(damaged), "--shard", "/2", env={
        k: v for k, v in os.environ.items() if k != SHARD_ENV})
    assert result.returncode == ExitCode.USAGE and SHARD_ENV in result.stderr


# -- merges that must be refused -------------------------------------------------------------


def _refused(*paths: Path, code: int = ExitCode.USAGE, words: str = "") -> None:
    result = invoke("report", "merge", *map(str, paths))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code and len(lines) == 1 and not result.stdout, result
    assert words in lines[0], lines
    as_json = invoke("report", "merge", "--json", *map(str, paths))
    assert json.loads(as_json.stdout)["exit_code"] == code


def test_bad_merges_are_refused(damaged: Path, tmp_path: Path) -> None:
    _, three = _sharded(damaged, 3, tmp_path / "three")
    _, two = _sharded(damaged, 2, tmp_path / "two")
    _refused(three[0], three[2], words="missing 1 of 3 shards: 1")
    _refused(*three, three[1], words="shard 1/3 is given twice")
    _refused(three[0], three[1], two[1], words="different N")

    def edited(name: str, source: Path, change: Any) -> Path:
        doc = json.loads(source.read_text())
        change(doc)
        path = tmp_path / name
        path.write_text(json.dumps(doc))
        return path

    other_version = edited("v.json", three[1], lambda d: d["shard"].update(regfsck="0.0.1"))
    _refused(three[0], other_version, three[2], words="different regfsck versions")
    other_root = edited("root.json", three[1], lambda d: d["shard"].update(root="/elsewhere"))
    _refused(three[0], other_root, three[2], words="different roots")
    foreign = json.loads(three[2].read_text())["findings"][0]
    stolen = edited("stolen.json", three[1], lambda d: d["findings"].append(foreign))
    _refused(three[0], stolen, three[2], words="holds a finding it does not own")
    _, strict = _sharded(damaged, 3, tmp_path / "strict", "--strict")
    _refused(three[0], strict[1], three[2], words="different options")

    # The tree changed between two shards' scans (a push): refused unless allowed.
    changed = copy_tree(damaged, tmp_path / "changed")
    _, before = _sharded(changed, 3, tmp_path / "before")
    _, again = _sharded(changed, 3, tmp_path / "again")
    assert _merge(before[0], again[1], before[2])[0] == ExitCode.FINDINGS  # same tree seen
    put_blob(changed, b"pushed meanwhile")
    _, pushed = _sharded(changed, 3, tmp_path / "pushed")
    _refused(before[0], pushed[1], before[2], words="--allow-changed-tree")
    code, _ = _merge(before[0], pushed[1], before[2], extra=("--allow-changed-tree",))
    assert code == ExitCode.FINDINGS

    _, unsharded = _verify_json(damaged)
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps(unsharded))
    _refused(plain, words="without verify --shard")
    failed = tmp_path / "failed.json"
    failed.write_text(json.dumps({"error": "not a registry root", "exit_code": 3}))
    _refused(three[0], failed, code=ExitCode.CANNOT_RUN, words="that shard failed")
    garbage = tmp_path / "garbage.json"
    garbage.write_bytes(b"\xff\x00{")
    _refused(garbage, words="not a verify report")
    _refused(tmp_path / "absent.json", code=ExitCode.CANNOT_RUN, words="cannot read")


def test_merge_human_output_and_file(damaged: Path, tmp_path: Path) -> None:
    _, whole = _verify_json(damaged)
    _, paths = _sharded(damaged, 2, tmp_path)
    out = tmp_path / "merged.json"
    result = invoke("report", "merge", *map(str, paths), "--output", str(out))
    assert result.returncode == ExitCode.FINDINGS
    assert json.loads(out.read_text()) == whole
    errors = whole["summary"]["errors"]
    assert f"{errors} errors" in result.stdout and "blob_digest_mismatch" in result.stdout
    assert "regfsck repair" in result.stderr  # verify's next steps, for the tree's root


# -- object storage ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def damaged_bucket(real_sample: tuple[Path, realtools.SampleInfo]
                   ) -> Iterator[tuple[objectstore.MotoServer, str]]:
    """The sample's images copied by skopeo into a registry writing through its own s3
    driver (moto; objectstore.fill), then damaged object by object: a flipped byte in two
    layers, a deleted config, a garbage `_layers` link."""
    missing = objectstore.moto_missing()
    if missing:
        pytest.skip(missing)
    with objectstore.MotoServer() as server:
        server.make_bucket("regfsck-shard")
        prefix = "reg/root"
        with objectstore.s3_registry(realtools.REGISTRY_BIN, server.endpoint, "regfsck-shard",
                                     "/" + prefix) as dst:
            objectstore.fill(real_sample[0], dst.host, "shard-doomed")
        client = server.client()
        v2 = f"{prefix}/docker/registry/v2/"
        blobs = sorted((o["Key"], o["Size"]) for o in objectstore.iter_keys(
            client, "regfsck-shard", v2 + "blobs/"))
        for key, _ in sorted(blobs, key=lambda item: -item[1])[:2]:  # the largest: layers
            body = bytearray(client.get_object(Bucket="regfsck-shard", Key=key)["Body"].read())
            body[len(body) // 2] ^= 0x01
            client.put_object(Bucket="regfsck-shard", Key=key, Body=bytes(body))
        config = real_sample[1].references[real_sample[1].tags["a/b"]["latest"]][0]
        client.delete_object(Bucket="regfsck-shard", Key=v2 + "blobs/sha256/{}/{}/data".format(
            config.split(":")[1][:2], config.split(":")[1]))
        link = next(o["Key"] for o in objectstore.iter_keys(
            client, "regfsck-shard", v2 + "repositories/a/b/_layers/"))
        client.put_object(Bucket="regfsck-shard", Key=link, Body=b"not a digest\n")
        yield server, f"s3://regfsck-shard/{prefix}"


@pytest.mark.parametrize("count", [1, 2, 3])
def test_shards_of_a_bucket_merge_into_the_unsharded_report(
        damaged_bucket: tuple[objectstore.MotoServer, str], tmp_path: Path, count: int) -> None:
    """The same on s3://: the merge equals one run but for `requests`, which add up (every
    shard lists the whole bucket; each GETs only its own blobs)."""
    server, url = damaged_bucket
    env = server.env()
    code, whole = _verify_json(url, env=env)
    assert code == ExitCode.FINDINGS
    assert {"blob_digest_mismatch", "reference_missing", "link_invalid"} <= {
        f["kind"] for f in whole["findings"]}  # (no directory objects: a config is just gone)
    codes, paths = _sharded(url, count, tmp_path, env=env)
    merge_code, merged = _merge(*paths)
    parts = [json.loads(p.read_text()) for p in paths]
    assert merged["requests"] == {k: sum(p["requests"].get(k, 0) for p in parts)
                                  for k in merged["requests"]}
    del merged["requests"], whole["requests"]
    assert merged == whole and merge_code == code == max(codes)
    # --changed-only: one --state-dir here (one machine); pods would each keep their own, and
    # as a digest's shard never changes for a given N, each record covers its shard's blobs.
    with tempfile.TemporaryDirectory() as state:
        _sharded(url, 2, tmp_path / "co", "--changed-only", "--state-dir", state, env=env)
        again = _merge(*_sharded(url, 2, tmp_path / "co2", "--changed-only", "--state-dir",
                                 state, env=env)[1])[1]
        assert again["summary"]["blobs_skipped"] > 0
        assert again["findings"] == whole["findings"]


def test_interrupted_shard_and_unwritable_output(damaged: Path, tmp_path: Path) -> None:
    """A shard stopped by Ctrl-C makes the merge exit 130, as one interrupted run would; a
    report that cannot be written is one line and exit 3, no half file."""
    _, paths = _sharded(damaged, 2, tmp_path)
    doc = json.loads(paths[1].read_text())
    doc["summary"]["interrupted"] = True
    paths[1].write_text(json.dumps(doc))
    code, merged = _merge(*paths)
    assert code == ExitCode.INTERRUPTED and merged["summary"]["interrupted"]
    result = invoke("verify", str(damaged), "--no-data", "--shard", "0/2", "--output",
                    str(tmp_path / "no-such-dir" / "r.json"))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == ExitCode.CANNOT_RUN, result
    assert lines[-1].startswith("regfsck: cannot write report"), lines
    assert not (tmp_path / "no-such-dir").exists()


findings_st = st.lists(st.fixed_dictionaries(
    {"kind": st.sampled_from(["blob_digest_mismatch", "link_invalid", "upload_stale"]),
     "severity": st.sampled_from(["error", "warning", "info"]),
     "path": st.text(max_size=8), "message": st.text(max_size=8)},
    optional={"digest": digests, "repo": st.text(max_size=4)}), max_size=30)


@given(found=findings_st, count=st.integers(1, 6))
def test_merge_of_a_partition_is_the_whole(found: list[dict[str, Any]], count: int) -> None:
    """Findings split by the ownership rule, counts split any way: the merge gives back the
    findings in verify's order and the counts added up."""
    from regfsck.report import ShardReport, finding_order, merge

    section = {"count": count, "regfsck": "x", "root": "/r", "tree": "t", "options": {}}
    reports = [ShardReport(f"r{k}", {
        "findings": [f for f in found if Shard(k, count).owns_finding(f.get("digest"))],
        "summary": {"errors": 99, "blobs_verified": k, "interrupted": False,
                    "hashed_because": {"new": 1}, "record": None},
        "shard": {**section, "index": k}}) for k in reversed(range(count))]
    merged = merge(reports)
    assert merged["findings"] == sorted(found, key=finding_order)
    assert merged["summary"] == {
        "errors": sum(f["severity"] == "error" for f in found), "blobs_verified":
        sum(range(count)), "interrupted": False, "hashed_because": {"new": count},
        "record": None, "record_error": None,
        "warnings": sum(f["severity"] == "warning" for f in found),
        "infos": sum(f["severity"] == "info" for f in found)}
