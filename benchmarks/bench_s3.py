"""regfsck against the official collector on a registry in S3, behind a region's latency.

The bucket: a synthetic tree (benchmarks/synth.py) put straight into the S3 server's backend
(`benchmarks/s3server.py`: moto with S3's listing cost, see there), then a few images pushed
by the **real registry** (Debian's docker-registry 2.8.2, s3 driver) into the same bucket and
prefix over HTTP, one of them deleted through the API and one upload left open, so the
driver's own layout (multipart-committed blobs, link objects, an emptied revision) is there
beside the synthetic one. A small proxy on 127.0.0.1 adds a fixed delay to every request
(20 ms by default, like a real region) and counts requests by kind.

Then, alternately in one run, the official `docker-registry garbage-collect --dry-run` (at
each delay of `--official-delays`) and `regfsck gc` (plan, at `--delay-ms`) read the same
bucket through the proxy; then `regfsck verify --no-data` and `regfsck verify`. Printed:
objects, requests by kind, wall and CPU seconds of the tool, CPU seconds of the S3 server,
the load average, the ratios, and whether both collectors chose the same blobs.

    python benchmarks/bench_s3.py --files 100000 --official-delays 0    # the issue's size
    python benchmarks/bench_s3.py --files 10000 --official-delays 20,0  # the official at 20 ms

The official collector is sequential (about 1.1 requests per object): at 20 ms a request,
100k objects take it about 45 minutes. `--official-delays 0` runs it without the added
latency (its requests still cost the proxy and moto their CPU); the time it would take at
20 ms is then *derived* (measured time + its request count x the delay) and printed as
such, never as a measurement; `--official-delays 20,0` at a smaller size measures both and
shows how well that derivation holds.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import synth  # noqa: E402

from tests.realtools import (  # noqa: E402
    OCILayoutWriter,
    free_port,
    parse_gc_output,
    pseudo_random_bytes,
    skopeo_copy,
)
from tests.support import objectstore  # noqa: E402

BUCKET, PREFIX = "bench", "registry"


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
            # Without it, the body written after the headers waits for the client's delayed
            # ACK (Nagle): ~40 ms more per request, which a sequential client pays in full.
            disable_nagle_algorithm = True

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
                elif self.command == "GET" and self.headers.get("Range"):
                    kind = "get_range"
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
                if proxy.delay:
                    time.sleep(proxy.delay)
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=300)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                self.send_response_only(resp.status)
                for key, value in resp.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length",
                                           "server", "date"):
                        self.send_header(key, value)
                # A HEAD has no body: its Content-Length is the object's size, kept as is.
                length_header = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length_header or str(len(data)))
                # headers and body in one write
                self._headers_buffer.append(b"\r\n")
                if self.command != "HEAD":
                    self._headers_buffer.append(data)
                self.wfile.write(b"".join(self._headers_buffer))
                self._headers_buffer = []

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        self.server.request_queue_size = 256
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


class S3Server:
    """benchmarks/s3server.py as a child process (its own core), preloaded from a tree."""

    def __init__(self, preload: Path) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "s3server.py"), "--port", str(self.port),
             "--bucket", BUCKET, "--prefix", PREFIX, "--preload", str(preload)],
            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
            env=objectstore.registry_env())
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().split()
        if not line or line[0] != "ready":
            self.stop()
            raise SystemExit("the S3 server did not start")
        self.preloaded = int(line[1])

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cpu(self) -> float:
        """User + system CPU seconds the server has used so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@dataclass
class Row:
    tool: str
    seconds: float
    cpu: float  # the tool's own user + system seconds (with its children)
    server_cpu: float  # the S3 server's during the run
    load: tuple[float, float]  # 1-minute load average before and after
    requests: dict[str, int]
    delay_ms: float
    round: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float, int, str, str]:
    """Wall seconds, CPU seconds (the command and its children), rc, stdout, stderr."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return (wall, usage.ru_utime + usage.ru_stime, proc.returncode,
                out.read().decode(errors="replace"), err.read().decode(errors="replace"))


class Bench:
    def __init__(self, server: S3Server, proxy: LatencyProxy) -> None:
        self.server = server
        self.proxy = proxy
        self.rows: list[Row] = []

    def _measure(self, tool: str, delay_ms: float, cmd: list[str], env: dict[str, str],
                 round_no: int) -> tuple[Row, int, str, str]:
        self.proxy.delay = delay_ms / 1000
        self.proxy.take()
        load0 = os.getloadavg()[0]
        cpu0 = self.server.cpu()
        wall, cpu, rc, out, err = _timed(cmd, env)
        row = Row(tool, wall, cpu, self.server.cpu() - cpu0, (load0, os.getloadavg()[0]),
                  self.proxy.take(), delay_ms, round_no)
        self.rows.append(row)
        return row, rc, out, err

    def official(self, binary: str, delay_ms: float, round_no: int) -> tuple[Row, set[str]]:
        with tempfile.TemporaryDirectory(prefix="bench-s3-") as tmp:
            config = objectstore.s3_registry_config(Path(tmp) / "config.yml", self.proxy.endpoint,
                                                BUCKET, "/" + PREFIX,
                                                path_style=binary != "docker-registry")
            row, rc, out, err = self._measure(
                "official gc --dry-run", delay_ms,
                [binary, "garbage-collect", "--dry-run", str(config)], objectstore.registry_env(),
                round_no)
        if rc != 0:
            raise SystemExit(f"official garbage-collect failed ({rc}):\n{(out + err)[-3000:]}")
        return row, parse_gc_output(out + err).blobs

    def regfsck(self, tool: str, delay_ms: float, args: list[str],
                round_no: int = 0) -> tuple[Row, dict[str, Any]]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(AWS_ENDPOINT_URL=self.proxy.endpoint, AWS_ACCESS_KEY_ID=objectstore.ACCESS_KEY,
                   AWS_SECRET_ACCESS_KEY=objectstore.SECRET_KEY, AWS_REGION=objectstore.REGION,
                   PYTHONPATH=str(HERE.parent))
        row, rc, out, err = self._measure(
            tool, delay_ms, [sys.executable, "-m", "regfsck", *args, "--json",
                             f"s3://{BUCKET}/{PREFIX}"], env, round_no)
        if rc not in (0, 1):
            raise SystemExit(f"regfsck {' '.join(args)} failed ({rc}): {err[-2000:]}")
        doc: dict[str, Any] = json.loads(out)
        row.extra["self_reported"] = doc.get("requests")
        return row, doc


def push_real_images(endpoint: str, images: int) -> set[str]:
    """Push `images` small images with the real 2.8 registry's s3 driver into the bucket;
    delete the last one through the API; leave an upload open. Returns the deleted image's
    blobs (manifest, config, its own layer), which a collector must find."""
    with objectstore.s3_registry("docker-registry", endpoint, BUCKET, "/" + PREFIX) as reg, \
            tempfile.TemporaryDirectory(prefix="bench-s3-layout-") as tmp:
        lay = OCILayoutWriter(Path(tmp) / "layout")
        base = lay.add_layer({"base.bin": pseudo_random_bytes("bench-s3-base", 30000)})
        last: dict[str, Any] = {}
        for i in range(images):
            own = lay.add_layer({f"app{i}.bin": pseudo_random_bytes(f"bench-s3-{i}", 20000)})
            last = lay.add_image([base, own], tag=f"v{i}", history=["ADD base", f"ADD app{i}"])
            skopeo_copy(lay.ref(f"v{i}"), f"docker://{reg.host}/real/app{i % 3}:v{i}",
                        "--preserve-digests")
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        repo = f"real/app{(images - 1) % 3}"
        opener.open(urllib.request.Request(f"http://{reg.host}/v2/{repo}/manifests/"
                                           f"{last['digest']}", method="DELETE"), timeout=60)
        opener.open(urllib.request.Request(f"http://{reg.host}/v2/real/app0/blobs/uploads/",
                                           data=b"", method="POST"), timeout=60)
        doc = json.loads(lay.read_blob(last["digest"]))
        return {last["digest"], doc["config"]["digest"], doc["layers"][1]["digest"]}


def _kinds(requests: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(requests.items()) if k != "total")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=100_000, help="synthetic objects (about)")
    parser.add_argument("--images", type=int, default=6, help="images the real registry pushes")
    parser.add_argument("--delay-ms", type=float, default=20.0, help="latency added per request")
    parser.add_argument("--official-delays", default="20",
                        help="delays (ms, comma-separated) to run the official collector at; "
                        "at 0 its time at --delay-ms is derived, not measured")
    parser.add_argument("--rounds", type=int, default=2, help="official/regfsck alternations")
    parser.add_argument("--registry", default="docker-registry", help="official binary (2.8 or 3)")
    parser.add_argument("--no-official", action="store_true", help="regfsck only")
    parser.add_argument("--no-verify", action="store_true", help="skip the verify measurements")
    parser.add_argument("--workdir", help="where the synthetic tree is written (default: "
                        "/dev/shm when it exists, else the temp dir)")
    parser.add_argument("--json", dest="json_out", help="also write the figures here")
    parser.add_argument("--hold", action="store_true", help="after setting up, print the "
                        "environment that reaches the bucket through the proxy and wait (for "
                        "profiling by hand); SIGTERM/Ctrl-C ends it")
    parser.add_argument("--apply", action="store_true", help="then measure gc --apply (with "
                        "--no-registry-check) and the undo of its run on the same bucket")
    args = parser.parse_args(argv)
    official_delays = [float(d) for d in args.official_delays.split(",") if d.strip()]

    workdir = args.workdir or ("/dev/shm" if os.path.isdir("/dev/shm") else None)
    tmp = Path(tempfile.mkdtemp(prefix="bench-s3-tree-", dir=workdir))
    server: S3Server | None = None
    proxy: LatencyProxy | None = None
    try:
        started = time.perf_counter()
        result = synth.generate(tmp / "root", synth.SynthConfig.for_files(args.files),
                                jobs=min(2, os.cpu_count() or 1))
        server = S3Server(tmp / "root")
        shutil.rmtree(tmp / "root")
        deleted = push_real_images(server.endpoint, args.images) if args.images else set()
        objects = len(server_keys(server))
        print(f"bucket: {objects} objects ({server.preloaded} synthetic, "
              f"{result.bytes / 1e6:.1f} MB, {len(result.repositories)} repositories; "
              f"{objects - server.preloaded} written by docker-registry 2.8's s3 driver); "
              f"ready in {time.perf_counter() - started:.0f}s", file=sys.stderr)
        expected = result.unreferenced | deleted
        proxy = LatencyProxy(server.port, args.delay_ms / 1000).start()
        bench = Bench(server, proxy)
        if args.hold:
            print(f"AWS_ENDPOINT_URL={proxy.endpoint} AWS_ACCESS_KEY_ID={objectstore.ACCESS_KEY} "
                  f"AWS_SECRET_ACCESS_KEY={objectstore.SECRET_KEY} AWS_REGION={objectstore.REGION} "
                  f"s3://{BUCKET}/{PREFIX} s3-server-pid={server.proc.pid}", flush=True)
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
            try:
                signal.sigwait({signal.SIGTERM, signal.SIGINT})
            finally:
                print(f"requests: {proxy.take()}", file=sys.stderr)
            return 0
        for round_no in range(args.rounds):
            if not args.no_official:
                for delay in official_delays:
                    row, blobs_off = bench.official(args.registry, delay, round_no)
                    row.extra["same_as_expected"] = blobs_off == expected
                    print(f"round {round_no}: official at {delay:g} ms: {row.seconds:.1f}s, "
                          f"{row.requests['total']} requests ({_kinds(row.requests)}); its blobs "
                          f"are the expected ones: {blobs_off == expected}", file=sys.stderr)
            row, plan = bench.regfsck("regfsck gc (plan)", args.delay_ms, ["gc", "--grace", "0"],
                                      round_no)
            ours = {b["digest"] for b in plan["blobs"]}
            row.extra["same_as_expected"] = ours == expected
            print(f"round {round_no}: regfsck gc at {args.delay_ms:g} ms: {row.seconds:.1f}s, "
                  f"{row.requests['total']} requests ({_kinds(row.requests)}); its blobs are "
                  f"the expected ones: {ours == expected}", file=sys.stderr)
        if not args.no_verify:
            bench.regfsck("regfsck verify --no-data", args.delay_ms, ["verify", "--no-data"])
            row, report = bench.regfsck("regfsck verify", args.delay_ms, ["verify"])
            summary = report["summary"]
            row.extra.update(bytes=summary["bytes_verified"], blobs=summary["blobs_verified"])
        if args.apply:
            row, applied = bench.regfsck("regfsck gc --apply", args.delay_ms,
                                         ["gc", "--grace", "0", "--apply", "--no-registry-check"])
            row.extra["moved"] = applied.get("apply", {}).get("moved")
            row, undone = bench.regfsck("regfsck undo", args.delay_ms,
                                        ["undo", "--no-registry-check"])
            row.extra["moved_back"] = undone.get("moved_back")
    finally:
        if proxy is not None:
            proxy.stop()
        if server is not None:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    report_rows(bench.rows, objects, args.delay_ms)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(
            {"objects": objects, "synthetic": server.preloaded, "delay_ms": args.delay_ms,
             "argv": sys.argv[1:], "rows": [r.__dict__ for r in bench.rows]}, indent=2))
    return 0


def server_keys(server: S3Server) -> list[str]:
    """Every key in the bucket (a direct listing, not through the proxy)."""
    client = objectstore.MotoServer()
    client.port = server.port  # only its client: the server is ours
    keys: list[str] = []
    for page in client.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


def report_rows(rows: list[Row], objects: int, delay_ms: float) -> None:
    print(f"\nobjects: {objects}   latency: {delay_ms:g} ms/request unless said")
    print(f"{'tool':26} {'ms/req':>6} {'seconds':>9} {'cpu s':>7} {'s3 cpu s':>8} "
          f"{'load':>9} {'requests':>9}  by kind")
    for row in rows:
        extra = ""
        if "bytes" in row.extra:
            extra = (f"  ({row.extra['blobs']} blobs, {row.extra['bytes'] / 1e6:.1f} MB, "
                     f"{row.extra['blobs'] / row.seconds:.0f} blobs/s)")
        if row.tool == "regfsck verify --no-data":
            extra = f"  ({objects / row.seconds:.0f} objects/s)"
        print(f"{row.tool:26} {row.delay_ms:6g} {row.seconds:9.2f} {row.cpu:7.1f} "
              f"{row.server_cpu:8.1f} {row.load[0]:4.1f}-{row.load[1]:<4.1f} "
              f"{row.requests['total']:9d}  {_kinds(row.requests)}{extra}")
    ours = [r for r in rows if r.tool == "regfsck gc (plan)"]
    official = [r for r in rows if r.tool.startswith("official")]
    if not ours or not official:
        return
    best_us = min(r.seconds for r in ours)
    req_us = ours[-1].requests["total"]
    for delay in sorted({r.delay_ms for r in official}):
        runs = [r for r in official if r.delay_ms == delay]
        best = min(r.seconds for r in runs)
        req = runs[-1].requests["total"]
        if delay == delay_ms:
            print(f"gc plan vs official, both measured at {delay:g} ms: {best / best_us:.1f}x "
                  f"faster (best of each), {req / max(1, req_us):.1f}x fewer requests "
                  f"({req} vs {req_us})")
        else:
            derived = best + req * (delay_ms - delay) / 1000
            print(f"official measured at {delay:g} ms: {best:.1f}s, {req} requests, sequential; "
                  f"DERIVED at {delay_ms:g} ms: {best:.1f} + {req} x {delay_ms - delay:g} ms = "
                  f"{derived:.0f}s -> gc plan (measured at {delay_ms:g} ms, {best_us:.1f}s) "
                  f"{derived / best_us:.1f}x faster (derived), {req / max(1, req_us):.1f}x "
                  f"fewer requests (measured)")


if __name__ == "__main__":
    sys.exit(main())
