"""`verify --deep` and `export` on a registry in S3 against the same tree on the local disk.

A tree is written by the real registry (`docker-registry` 2.8, filesystem driver) from images
built here (IMAGES images of LAYERS gzip tar layers of about LAYER_MB each: half random
bytes, half text), then uploaded key for key into a bucket of a local S3 server
(`moto_server`) behind the latency proxy of bench_s3.py (20 ms per request by default, like
a real region; it counts the requests by kind). Then, in turn on the bucket and on the disk
tree: `regfsck verify --deep`, and `regfsck export` of every image into an OCI layout.
Printed: time, requests by kind (as counted by the proxy and as regfsck reports them), bytes.

    python benchmarks/bench_s3_read.py --images 20 --layers 3 --layer-mb 2

moto spends CPU on every request and every byte (and the proxy buffers each response):
on this shared machine the bucket's times are bounded by them, not by regfsck.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_s3 import LatencyProxy  # noqa: E402

from tests import realtools  # noqa: E402
from tests.support import objectstore  # noqa: E402


def build_tree(root: Path, images: int, layers: int, layer_bytes: int) -> list[str]:
    """Images pushed by skopeo into a real 2.8 registry on `root`; returns their refs."""
    refs = []
    with tempfile.TemporaryDirectory(prefix="bench-s3r-layout-") as tmp, \
            realtools.RealRegistry(root) as reg:
        for n in range(images):
            lay = realtools.OCILayoutWriter(Path(tmp) / f"l{n}")
            built = []
            for i in range(layers):
                half = layer_bytes // 2
                text = (f"image {n} layer {i} line\n" * (half // 20 + 1)).encode()[:half]
                built.append(lay.add_layer({
                    "rand.bin": realtools.pseudo_random_bytes(f"bench-{n}-{i}", half),
                    "text.txt": text}))
            lay.add_image(built, tag="v1", history=[f"ADD {i}" for i in range(layers)])
            ref = f"bench/img{n}:v1"
            realtools.skopeo_copy(lay.ref("v1"), f"docker://{reg.host}/{ref}", "--preserve-digests")
            refs.append(ref)
    return refs


def run(env: dict[str, str], *args: str) -> tuple[float, dict[str, Any]]:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "regfsck", *args, "--json"], capture_output=True,
                          text=True, env=env, check=False)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"regfsck {' '.join(args)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return elapsed, json.loads(proc.stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--layer-mb", type=float, default=2.0)
    parser.add_argument("--delay-ms", type=float, default=20.0, help="latency added per request")
    args = parser.parse_args(argv)

    with objectstore.MotoServer() as moto, tempfile.TemporaryDirectory(prefix="bench-s3r-") as tmp_s:
        tmp = Path(tmp_s)
        root = tmp / "root"
        started = time.perf_counter()
        refs = build_tree(root, args.images, args.layers, int(args.layer_mb * (1 << 20)))
        moto.make_bucket("bench")
        objects = objectstore.upload_tree(moto.client(), root, "bench", "registry", jobs=32)
        print(f"tree: {len(refs)} images, {objects} objects; built and uploaded in "
              f"{time.perf_counter() - started:.0f}s", file=sys.stderr)
        proxy = LatencyProxy(moto.port, args.delay_ms / 1000).start()
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(AWS_ENDPOINT_URL=proxy.endpoint, AWS_ACCESS_KEY_ID=objectstore.ACCESS_KEY,
                   AWS_SECRET_ACCESS_KEY=objectstore.SECRET_KEY, AWS_REGION=objectstore.REGION,
                   PYTHONPATH=str(HERE.parent))
        rows = []
        try:
            for where, target in (("bucket", "s3://bench/registry"), ("disk", str(root))):
                proxy.take()
                seconds, doc = run(env, "verify", "--deep", target)
                rows.append((f"verify --deep ({where})", seconds, proxy.take(), doc.get("requests"),
                             doc["deep"]["bytes_read"]))
                out = tmp / f"export-{where}"
                seconds, doc = run(env, "export", target, *refs, "-o", str(out))
                rows.append((f"export ({where})", seconds, proxy.take(), doc.get("requests"),
                             doc["blob_bytes"]))
        finally:
            proxy.stop()
    print(f"\n{len(refs)} images x {args.layers} layers x {args.layer_mb:g} MB, "
          f"{objects} objects, {args.delay_ms:g} ms/request")
    print(f"{'command':26} {'seconds':>8} {'requests':>9}  {'MB':>7}  proxy by kind / regfsck's own count")
    for name, seconds, counted, reported, nbytes in rows:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(counted.items()) if k != "total")
        print(f"{name:26} {seconds:8.2f} {counted['total']:9d}  {nbytes / 1e6:7.1f}  {kinds}"
              + (f" / {reported['total']}" if reported else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
