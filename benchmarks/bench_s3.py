"""regfsck against the official collector on a registry in S3, behind a region's latency.

A synthetic tree (benchmarks/synth.py) is uploaded key for key into a bucket of a local S3
server (`moto_server`) with concurrent PUTs; a small proxy on 127.0.0.1 adds a fixed delay to
every request (20 ms by default, like a real region) and counts the requests by kind. Then,
alternately in one run, the official `docker-registry garbage-collect --dry-run` and
`regfsck gc` (plan only) read the same bucket through the proxy; then `regfsck verify
--no-data` and `regfsck verify`. Printed: objects, requests by kind, times and the ratios,
and whether both collectors chose the same blobs.

    python benchmarks/bench_s3.py --files 100000          # the issue's size
    python benchmarks/bench_s3.py --files 5000 --rounds 1 # what fits a busy 2-core machine

moto spends ~2.5 ms of one core per request: on small trees moto, not latency, dominates,
so request counts are printed beside times. The official collector is sequential: at 20 ms
a request, 100k objects take it about an hour.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import synth  # noqa: E402

from tests.realtools import free_port, parse_gc_output  # noqa: E402
from tests.support import objectstore  # noqa: E402


class LatencyProxy:
    """A reverse proxy in front of the S3 server: sleeps `delay` per request, counts them."""

    def __init__(self, upstream_port: int, delay: float) -> None:
        self.upstream_port = upstream_port
        self.delay = delay
        self.counts: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.port = free_port()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                query = urllib.parse.urlparse(self.path).query
                params = urllib.parse.parse_qs(query, keep_blank_values=True)
                if self.command == "GET" and ("list-type" in params or "prefix" in params
                                              or "delimiter" in params or "max-keys" in params):
                    kind = "list"
                elif self.command == "GET":
                    kind = "get"
                elif self.command == "PUT" and self.headers.get("x-amz-copy-source"):
                    kind = "copy"
                elif self.command == "POST" and "delete" in params:
                    kind = "delete"
                else:
                    kind = self.command.lower()
                with proxy.lock:
                    proxy.counts[kind] += 1
                time.sleep(proxy.delay)
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=300)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                self.send_response(resp.status)
                for key, value in resp.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length",
                                           "server", "date"):
                        self.send_header(key, value)
                # A HEAD has no body: its Content-Length is the object's size, kept as is.
                length_header = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length_header or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LatencyProxy:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def take(self) -> dict[str, int]:
        with self.lock:
            counts = dict(self.counts)
            self.counts.clear()
        counts["total"] = sum(counts.values())
        return counts


def _official(binary: str, proxy: LatencyProxy, bucket: str,
              prefix: str) -> tuple[float, dict[str, int], set[str]]:
    with tempfile.TemporaryDirectory(prefix="bench-s3-") as tmp:
        config = objectstore.s3_registry_config(Path(tmp) / "config.yml", proxy.endpoint, bucket,
                                            "/" + prefix, path_style=binary != "docker-registry")
        proxy.take()
        started = time.perf_counter()
        proc = subprocess.run([binary, "garbage-collect", "--dry-run", str(config)],
                              capture_output=True, env=objectstore.registry_env(), check=False)
        elapsed = time.perf_counter() - started
    out = (proc.stdout + proc.stderr).decode(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"official garbage-collect failed ({proc.returncode}):\n{out[-3000:]}")
    return elapsed, proxy.take(), parse_gc_output(out).blobs


def _regfsck(proxy: LatencyProxy, url: str, *args: str) -> tuple[float, dict[str, int], dict[str, Any]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ENDPOINT_URL=proxy.endpoint, AWS_ACCESS_KEY_ID=objectstore.ACCESS_KEY,
               AWS_SECRET_ACCESS_KEY=objectstore.SECRET_KEY, AWS_REGION=objectstore.REGION,
               PYTHONPATH=str(HERE.parent))
    proxy.take()
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "regfsck", *args, "--json", url],
                          capture_output=True, text=True, env=env, check=False)
    elapsed = time.perf_counter() - started
    if proc.returncode not in (0, 1):
        raise SystemExit(f"regfsck {' '.join(args)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return elapsed, proxy.take(), json.loads(proc.stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=100_000, help="objects in the bucket (about)")
    parser.add_argument("--delay-ms", type=float, default=20.0, help="latency added per request")
    parser.add_argument("--rounds", type=int, default=2, help="official/regfsck alternations")
    parser.add_argument("--registry", default="docker-registry", help="official binary (2.8 or 3)")
    parser.add_argument("--no-verify", action="store_true", help="skip the verify measurements")
    parser.add_argument("--json", dest="json_out", help="also write the figures here")
    parser.add_argument("--apply", action="store_true", help="then measure gc --apply (with "
                        "--no-registry-check) and the undo of its run on the same bucket")
    args = parser.parse_args(argv)

    with objectstore.MotoServer() as moto, tempfile.TemporaryDirectory(prefix="bench-s3-tree-") as tmp:
        root = Path(tmp) / "root"
        started = time.perf_counter()
        result = synth.generate(root, synth.SynthConfig.for_files(args.files),
                                jobs=os.cpu_count() or 1)
        bucket, prefix = "bench", "registry"
        moto.make_bucket(bucket)
        objects = objectstore.upload_tree(moto.client(), root, bucket, prefix, jobs=64)
        print(f"tree: {objects} objects, {result.bytes / 1e6:.1f} MB, {len(result.repositories)} "
              f"repositories; built and uploaded in {time.perf_counter() - started:.0f}s",
              file=sys.stderr)
        proxy = LatencyProxy(moto.port, args.delay_ms / 1000).start()
        url = f"s3://{bucket}/{prefix}"
        rows: list[dict[str, Any]] = []
        try:
            for round_no in range(args.rounds):
                t_off, r_off, blobs_off = _official(args.registry, proxy, bucket, prefix)
                rows.append({"round": round_no, "tool": "official gc --dry-run", "seconds": t_off,
                             "requests": r_off})
                t_us, r_us, plan = _regfsck(proxy, url, "gc", "--grace", "0")
                rows.append({"round": round_no, "tool": "regfsck gc (plan)", "seconds": t_us,
                             "requests": r_us, "self_reported": plan.get("requests")})
                same = {b["digest"] for b in plan["blobs"]} == blobs_off
                print(f"round {round_no}: official {t_off:.1f}s {r_off['total']} req; regfsck "
                      f"{t_us:.1f}s {r_us['total']} req; {t_off / t_us:.1f}x faster, "
                      f"{r_off['total'] / max(1, r_us['total']):.1f}x fewer requests; "
                      f"same blobs: {same}", file=sys.stderr)
            if args.apply:
                t_a, r_a, applied = _regfsck(proxy, url, "gc", "--grace", "0", "--apply",
                                             "--no-registry-check")
                moved = applied.get("apply", {}).get("moved")
                rows.append({"tool": "regfsck gc --apply", "seconds": t_a, "requests": r_a,
                             "self_reported": applied.get("requests"), "moved": moved})
                print(f"gc --apply: {t_a:.1f}s, {moved} paths moved, requests {r_a}",
                      file=sys.stderr)
                t_u, r_u, undone = _regfsck(proxy, url, "undo", "--no-registry-check")
                rows.append({"tool": "regfsck undo", "seconds": t_u, "requests": r_u,
                             "moved_back": undone.get("moved_back")})
                print(f"undo: {t_u:.1f}s, {undone.get('moved_back')} moved back, requests {r_u}",
                      file=sys.stderr)
            if not args.no_verify:
                t_nd, r_nd, _ = _regfsck(proxy, url, "verify", "--no-data")
                rows.append({"tool": "regfsck verify --no-data", "seconds": t_nd, "requests": r_nd})
                t_v, r_v, report = _regfsck(proxy, url, "verify")
                summary = report["summary"]
                rows.append({"tool": "regfsck verify", "seconds": t_v, "requests": r_v,
                             "bytes": summary["bytes_verified"], "blobs": summary["blobs_verified"]})
        finally:
            proxy.stop()

    official = [r for r in rows if r["tool"].startswith("official")]
    ours = [r for r in rows if r["tool"] == "regfsck gc (plan)"]
    best_off = min(r["seconds"] for r in official)
    best_us = min(r["seconds"] for r in ours)
    print(f"\nobjects: {objects}   latency: {args.delay_ms:g} ms/request   rounds: {args.rounds}")
    print(f"{'tool':28} {'seconds':>9} {'requests':>9}  by kind")
    for row in rows:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(row["requests"].items()) if k != "total")
        extra = ""
        if "bytes" in row:
            extra = (f"  ({row['blobs']} blobs, {row['bytes'] / 1e6:.1f} MB, "
                     f"{row['bytes'] / 1e6 / row['seconds']:.1f} MB/s, "
                     f"{row['blobs'] / row['seconds']:.0f} blobs/s)")
        print(f"{row['tool']:28} {row['seconds']:9.2f} {row['requests']['total']:9d}  {kinds}{extra}")
    req_off = official[-1]["requests"]["total"]
    req_us = ours[-1]["requests"]["total"]
    print(f"\ngc plan: {best_off / best_us:.1f}x faster (best of each), "
          f"{req_off / max(1, req_us):.1f}x fewer requests ({req_off} vs {req_us})")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"objects": objects, "delay_ms": args.delay_ms,
                                                   "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
