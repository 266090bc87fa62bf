"""`verify --deep` and `export -o X.tar.gz` against the tools that set their limits.

It writes a registry tree of images whose layers are real files (from /usr, so they
compress like real layers), about --mb MB of uncompressed tar, gzip'd by `pigz -6` (or
Python's gzip) and, every third layer, zstd'd. Then, interleaved round after round:

* limit_inflate: every layer through `pigz -d` / `zstd -d`, one process per core
  (`xargs -P`), output to /dev/null ("plus nothing");
* limit_inflate_sha: the same piped through `sha256sum` (the diff_id hash deep must do);
* deep_only: `regfsck verify --deep --no-data` (layers only, each read once);
* verify_deep: `regfsck verify --deep` (every blob re-hashed + every layer checked); with
  `--baseline DIR` also the same two commands run from another checkout (the code before);
* verify_deep_zlib: verify --deep with REGFSCK_DEFLATE=zlib (the fallback without ISA-L);
* export_gz: `regfsck export ROOT every-image -o x.tar.gz` against `gzip -6` of the
  plain `.tar` export (already written, in the page cache: the floor of `tar | gzip -6`)
  and `pigz -6` of it.

Wall time is printed with CPU time (user + system, all threads and children): on this shared
2-core machine the wall clock swings 2x with others' load, CPU time much less.

    python benchmarks/bench_deep.py --mb 512
    python benchmarks/bench_deep.py --mb 512 --baseline /tmp/regfsck-before
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import measure
from measure import Series, log

from regfsck import layout

V2 = "docker/registry/v2"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYERS_PER_IMAGE = 4


def _put(root: Path, rel: str, data: bytes) -> None:
    path = root / V2 / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _files(top: str = "/usr") -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath, name)
            if path.is_file() and not path.is_symlink():
                yield path


def _tars(total: int, size: int) -> Iterator[bytes]:
    """Tars of about `size` bytes of real files, `total` bytes in all (cycling if needed)."""
    made = 0
    while made < total:
        for_this = min(size, total - made)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for path in _files():
                try:
                    tar.add(str(path), arcname=f"l{made}/{path}", recursive=False)
                except OSError:
                    continue
                if buf.tell() >= for_this:
                    break
        data = buf.getvalue()
        made += len(data)
        yield data


def _compress(tar: bytes, kind: str) -> tuple[bytes, str]:
    if kind == "zstd":
        return (zstandard.ZstdCompressor(level=3).compress(tar),
                "application/vnd.oci.image.layer.v1.tar+zstd")
    if measure.have("pigz"):
        data = subprocess.run(["pigz", "-6", "-c"], input=tar, capture_output=True, check=True).stdout
    else:
        data = gzip.compress(tar, compresslevel=6, mtime=0)
    return data, "application/vnd.oci.image.layer.v1.tar+gzip"


def write_tree(root: Path, mb: int, layer_mb: int) -> tuple[list[str], list[tuple[str, Path]]]:
    """The tree; returns (image refs, [(gz|zst, layer blob path)])."""
    refs: list[str] = []
    layers: list[tuple[str, Path]] = []
    pending: list[tuple[str, str, int, str]] = []  # (digest, media type, size, diff_id)
    image = 0

    def flush() -> None:
        nonlocal image
        repo = f"bench/img{image}"
        config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {
            "type": "layers", "diff_ids": [p[3] for p in pending]}}).encode()
        blobs = [(_digest(config), config)]
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": blobs[0][0], "size": len(config)},
            "layers": [{"mediaType": m, "digest": d, "size": s} for d, m, s, _ in pending]}).encode()
        for digest, data in blobs:
            _put(root, layout.blob_data(digest), data)
        for digest in [blobs[0][0], *(p[0] for p in pending)]:
            _put(root, layout.layer_link(repo, digest), digest.encode())
        mdigest = _digest(manifest)
        _put(root, layout.blob_data(mdigest), manifest)
        _put(root, layout.revision_link(repo, mdigest), mdigest.encode())
        _put(root, layout.tag_current_link(repo, "latest"), mdigest.encode())
        _put(root, layout.tag_index_link(repo, "latest", mdigest), mdigest.encode())
        refs.append(f"{repo}:latest")
        pending.clear()
        image += 1

    for i, tar in enumerate(_tars(mb << 20, layer_mb << 20)):
        kind = "zstd" if i % 3 == 2 else "gzip"
        data, media_type = _compress(tar, kind)
        digest = _digest(data)
        _put(root, layout.blob_data(digest), data)
        layers.append(("zst" if kind == "zstd" else "gz", root / V2 / layout.blob_data(digest)))
        pending.append((digest, media_type, len(data), _digest(tar)))
        if len(pending) == LAYERS_PER_IMAGE:
            flush()
    if pending:
        flush()
    return refs, layers


def _sh(script: str) -> list[str]:
    return ["sh", "-c", script]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=int, default=512, help="MB of uncompressed layer tars")
    parser.add_argument("--layer-mb", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", help="another regfsck checkout to time alongside")
    parser.add_argument("--no-export", action="store_true")
    parser.add_argument("--workdir")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--json", dest="json_out")
    args = parser.parse_args(argv)
    for tool in ("pigz", "zstd", "sha256sum"):
        if not measure.have(tool):
            raise SystemExit(f"{tool} is not installed: no limit to compare against "
                             "(apt-get install pigz zstd)")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="regfsck-bench-deep-"))
    workdir.mkdir(parents=True, exist_ok=True)
    root = workdir / "root"
    cores = measure.cpu_count()
    try:
        if not root.exists():
            log(f"== writing {args.mb} MB of layers into {root}")
            refs, layers = write_tree(root, args.mb, args.layer_mb)
            (workdir / "refs.json").write_text(json.dumps(
                {"refs": refs, "layers": [(k, str(p)) for k, p in layers]}))
        saved = json.loads((workdir / "refs.json").read_text())
        refs, layers = saved["refs"], [(k, Path(p)) for k, p in saved["layers"]]
        layers.sort(key=lambda kp: kp[1].stat().st_size, reverse=True)
        compressed = sum(p.stat().st_size for _, p in layers)
        listing = workdir / "layers.txt"
        listing.write_text("".join(f"{k} {p}\n" for k, p in layers))
        inflate = ('if [ "$0" = gz ]; then pigz -dc "$1"; else zstd -dcq "$1"; fi')
        commands: dict[str, Any] = {
            "limit_inflate": lambda: measure.run(_sh(
                f"xargs -P {cores} -L 1 sh -c '{inflate} > /dev/null' < {listing}")),
            "limit_inflate_sha": lambda: measure.run(_sh(
                f"xargs -P {cores} -L 1 sh -c '{inflate} | sha256sum > /dev/null' < {listing}")),
            "deep_only": lambda: measure.run(measure.regfsck_cmd(
                "verify", "--deep", "--no-data", "--json", str(root))),
            "verify_deep": lambda: measure.run(measure.regfsck_cmd(
                "verify", "--deep", "--json", str(root))),
            "verify_deep_zlib": lambda: measure.run(measure.regfsck_cmd(
                "verify", "--deep", "--json", str(root)), env=measure.clean_env(
                    {"REGFSCK_DEFLATE": "zlib"})),
        }
        if args.baseline:
            commands["deep_only_before"] = lambda: measure.baseline_run(
                args.baseline, measure.regfsck_cmd("verify", "--deep", "--no-data", "--json", str(root)))
            commands["verify_deep_before"] = lambda: measure.baseline_run(
                args.baseline, measure.regfsck_cmd("verify", "--deep", "--json", str(root)))
        plain_tar = workdir / "plain.tar"
        if not args.no_export:
            out = workdir / "out.tar.gz"
            if not plain_tar.exists():
                measure.run(measure.regfsck_cmd("export", str(root), *refs, "-o", str(plain_tar)))
            export = " ".join([*measure.regfsck_cmd("export", str(root), *refs), "-o", str(out)])
            commands["export_gz"] = lambda: measure.run(_sh(f"rm -f {out}; {export}"))
            commands["export_gz_zlib"] = lambda: measure.run(
                _sh(f"rm -f {out}; {export}"), env=measure.clean_env({"REGFSCK_DEFLATE": "zlib"}))
            if args.baseline:
                commands["export_gz_before"] = lambda: measure.baseline_run(
                    args.baseline, _sh(f"rm -f {out}; {export}"))
            commands["tar_gzip6"] = lambda: measure.run(_sh(f"gzip -6 -c {plain_tar} > {out}.ref"))
            commands["tar_pigz6"] = lambda: measure.run(_sh(f"pigz -6 -c {plain_tar} > {out}.ref"))
        check = measure.run(measure.regfsck_cmd("verify", "--deep", "--json", str(root)), capture=True)
        doc = json.loads(check.stdout)
        if check.returncode != 0 or doc["deep"]["layers_checked"] != len(layers):
            raise SystemExit(f"verify --deep did not pass cleanly: rc {check.returncode} {doc['summary']}")
        log(f"   {len(layers)} layers, {compressed / 1e6:.0f} MB compressed -> "
            f"{doc['deep']['bytes_uncompressed'] / 1e6:.0f} MB; {cores} cores")
        series = measure.interleaved(commands, args.rounds, log)
        report(series, compressed, plain_tar)
        if args.json_out:
            with open(args.json_out, "w") as fh:
                json.dump({k: v.to_json() for k, v in series.items()}, fh, indent=2)
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


def report(series: dict[str, Series], compressed: int, plain_tar: Path) -> None:
    def row(name: str, against: str | None) -> None:
        if name not in series:
            return
        s = series[name]
        ratio = cpu_ratio = ""
        if against is not None and against in series:
            ratio = f"x{s.median / series[against].median:.2f}"
            cpu_ratio = f"x{s.cpu_median / series[against].cpu_median:.2f}"
        print(f"{name:>20} {s.median:>8.2f}s {ratio:>7} {s.cpu_median:>8.2f}s {cpu_ratio:>7} "
              f"{s.rss_mb:>6.0f}MB")

    print(f"\nverify --deep ({compressed / 1e6:.0f} MB of layers) — medians; ratios vs the "
          "reference named in brackets")
    print(f"{'command':>20} {'wall':>9} {'ratio':>7} {'cpu':>9} {'ratio':>7} {'RSS':>8}")
    for name, against in (("limit_inflate", None), ("limit_inflate_sha", "limit_inflate"),
                          ("deep_only", "limit_inflate"), ("deep_only_before", "limit_inflate"),
                          ("verify_deep", "limit_inflate"), ("verify_deep_zlib", "verify_deep"),
                          ("verify_deep_before", "verify_deep")):
        row(name, against)
    if "export_gz" in series:
        size = plain_tar.stat().st_size / 1e6
        print(f"\nexport to .tar.gz ({size:.0f} MB of tar) — ratios vs tar_gzip6")
        print(f"{'command':>20} {'wall':>9} {'ratio':>7} {'cpu':>9} {'ratio':>7} {'RSS':>8}")
        for name in ("tar_gzip6", "tar_pigz6", "export_gz", "export_gz_zlib", "export_gz_before"):
            row(name, None if name == "tar_gzip6" else "tar_gzip6")


if __name__ == "__main__":
    sys.exit(main())
