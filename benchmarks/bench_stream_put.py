"""Peak memory of creating one large object on S3: the streaming conditional put that
`import --apply` (and every `Run.create_file` on object storage) writes blobs with, against
the whole-object PutObject it replaced.

A moto server on 127.0.0.1; for each mode a fresh Python process creates one object of
--mb MiB from 1 MiB chunks generated on the fly (never held together) and reports its peak
RSS (`ru_maxrss`) before and after the write:

* stream: `ObjectMutator.put_new` (multipart, parts of 8 MiB, 4 in flight, completed with
  If-None-Match: *);
* whole: `b"".join(chunks)` then one PutObject with If-None-Match: * (the old
  `ObjectRootStorage.write_new_file`).

    python benchmarks/bench_stream_put.py --mb 512
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
KEY = "regfsck-bench-key"
SECRET = "regfsck-bench-secret"


def _chunks(mb: int) -> Iterator[bytes]:
    seed = hashlib.sha256(b"bench_stream_put").digest()
    for i in range(mb):
        block = hashlib.sha256(seed + i.to_bytes(8, "big")).digest()
        yield block * (1 << 15)  # 1 MiB, distinct per chunk, made when asked for


def child(mode: str, endpoint: str, bucket: str, mb: int) -> None:
    sys.path.insert(0, str(REPO_ROOT))
    from regfsck.objectstore import ObjectMutator, request_counts
    from regfsck.root import S3Location

    location = S3Location(bucket, "bench", endpoint=endpoint, access_key=KEY, secret_key=SECRET,
                          region="us-east-1", force_path_style=True)
    mutator = ObjectMutator(location)
    mutator.head("warm-up")  # clients and runtimes loaded before the base is taken
    mutator._boto()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    if mode == "stream":
        size = mutator.put_new(f"{mode}/blob", _chunks(mb))
    else:
        data = b"".join(_chunks(mb))
        mutator.put(f"{mode}/blob", data, create=True)
        size = len(data)
        del data
    elapsed = time.monotonic() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"mode": mode, "bytes": size, "seconds": round(elapsed, 2),
                      "base_rss_mib": round(base / 1024, 1), "peak_rss_mib": round(peak / 1024, 1),
                      "above_base_mib": round((peak - base) / 1024, 1),
                      "requests": request_counts()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=512, help="object size in MiB")
    parser.add_argument("--modes", default="stream,whole")
    parser.add_argument("--child", nargs=4, metavar=("MODE", "ENDPOINT", "BUCKET", "MB"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, endpoint, bucket, mb = args.child
        child(mode, endpoint, bucket, int(mb))
        return
    if shutil.which("moto_server") is None:
        sys.exit("moto_server not installed (pip install 'moto[server]')")
    sys.path.insert(0, str(REPO_ROOT))
    from tests.realtools import free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    server = subprocess.Popen(["moto_server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        for _ in range(300):
            try:
                opener.open(endpoint + "/moto-api/", timeout=2).read()
                break
            except OSError:
                time.sleep(0.1)
        request = urllib.request.Request(f"{endpoint}/bench", method="PUT")
        opener.open(request, timeout=30).read()
        for mode in args.modes.split(","):
            out = subprocess.run([sys.executable, __file__, "--child", mode, endpoint, "bench",
                                  str(args.mb)], env=env, capture_output=True, text=True,
                                 check=False)
            if out.returncode != 0:
                print(f"{mode}: failed\n{out.stderr[-2000:]}")
                continue
            print(out.stdout.strip())
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
