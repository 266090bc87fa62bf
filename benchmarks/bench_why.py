"""`why` on deep chains of nested index revisions: time and peak RSS must grow linearly.

For each depth N (default 1000, 2000, 4000) it writes a small tree: one image (config and
layer, tagged) and N OCI indexes stacked on it, each a revision of the repository and
listing the one below (tests/test_hostile_manifests.py `nested_indexes`, the tree of
`test_long_chain_of_nested_indexes`); the top is tagged. Then, interleaved round after
round, `regfsck why ROOT <layer> --json` and `regfsck why ROOT <top index> --json`.
It prints median wall time, peak RSS and the growth factor from each depth to the next
(linear: ~2 per doubling; quadratic: ~4).

    python benchmarks/bench_why.py
    python benchmarks/bench_why.py --depths 1000,2000,4000 --rounds 3
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import measure
from measure import Series, log

from regfsck import layout
from tests.support.tree import add_manifest, nested_indexes, put

REPO = "bench/chain"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _blob(root: Path, data: bytes) -> str:
    digest = _digest(data)
    put(root, layout.blob_data(digest), data)
    put(root, layout.layer_link(REPO, digest), digest.encode())
    return digest


def write_tree(root: Path, depth: int) -> tuple[str, str]:
    """The chain tree; returns (layer digest, top index digest)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("hello")
        info.size = 6
        tar.addfile(info, io.BytesIO(b"hello\n"))
    layer_tar = buf.getvalue()
    layer = _blob(root, layer_tar)
    config_doc = {"architecture": "amd64", "os": "linux",
                  "rootfs": {"type": "layers", "diff_ids": [layer]}}
    config_bytes = json.dumps(config_doc).encode()
    config = _blob(root, config_bytes)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config,
                   "size": len(config_bytes)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer,
                    "size": len(layer_tar)}]}).encode()
    leaf = add_manifest(root, REPO, manifest, "image")
    top = nested_indexes(root, REPO, leaf, depth, tag="chain")
    return layer, top


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depths", default="1000,2000,4000")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", help="another regfsck checkout to time alongside")
    parser.add_argument("--workdir")
    parser.add_argument("--json", dest="json_out")
    args = parser.parse_args(argv)
    depths = [int(d) for d in args.depths.split(",")]
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="regfsck-bench-why-"))
    results: list[dict[str, Any]] = []
    try:
        for depth in depths:
            root = workdir / f"chain-{depth}"
            shutil.rmtree(root, ignore_errors=True)
            layer, top = write_tree(root, depth)
            log(f"== depth {depth}: {root}")
            check = measure.run(measure.regfsck_cmd("why", str(root), layer, "--json"), capture=True)
            doc = json.loads(check.stdout)
            assert len(doc["paths"]) == depth + 1, len(doc["paths"])
            commands = {
                "why_layer": lambda r=root, d=layer: measure.run(
                    measure.regfsck_cmd("why", str(r), d, "--json")),
                "why_top": lambda r=root, d=top: measure.run(
                    measure.regfsck_cmd("why", str(r), d, "--json")),
            }
            if args.baseline:
                commands["why_layer_before"] = lambda r=root, d=layer: measure.baseline_run(
                    args.baseline, measure.regfsck_cmd("why", str(r), d, "--json"))
                commands["why_top_before"] = lambda r=root, d=top: measure.baseline_run(
                    args.baseline, measure.regfsck_cmd("why", str(r), d, "--json"))
            series = measure.interleaved(commands, args.rounds, log)
            results.append({"depth": depth, "output_bytes": len(check.stdout), "_series": series,
                            "series": {k: v.to_json() for k, v in series.items()}})
            shutil.rmtree(root)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print("\nregfsck why on a chain of N nested index revisions: medians of wall and CPU time, "
          "peak RSS; growth = CPU time vs the previous depth (linear ~x2 per doubling)")
    names = [n for n in ("why_layer", "why_top", "why_layer_before", "why_top_before")
             if n in results[0]["_series"]]
    print(f"{'depth':>6} {'JSON out':>9}  " + "  ".join(f"{n:>34}" for n in names))
    previous: dict[str, Series] | None = None
    for res in results:
        s: dict[str, Series] = res["_series"]
        cells = []
        for name in names:
            growth = (f"x{s[name].cpu_median / previous[name].cpu_median:.2f}" if previous else "")
            cells.append(f"{s[name].median:>7.2f}s {s[name].cpu_median:>7.2f}s cpu "
                         f"{s[name].rss_mb:>5.0f}MB {growth:>6}")
        print(f"{res['depth']:>6} {res['output_bytes'] / 1e6:>7.1f}MB  " + "  ".join(cells))
        previous = s
    measure.write_results(args.json_out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
