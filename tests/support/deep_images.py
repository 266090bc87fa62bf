"""Images with one crafted defect each that only `verify --deep` sees, pushed through the
real registry (which checks only that each blob hashes to its digest): the tree of
tests/test_deep_realtools.py and test_deep_single_pass.py."""

from __future__ import annotations

import gzip
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import zstandard

from tests.realtools import (
    MT_OCI_LAYER,
    MT_OCI_LAYER_GZIP,
    MT_OCI_LAYER_ZSTD,
    Layer,
    OCILayoutWriter,
    RealRegistry,
    make_tar,
    pseudo_random_bytes,
    sha256_digest,
)


@dataclass
class Crafted:
    root: Path
    expected: set[tuple[str, str, str]]  # (kind, repo, digest)
    clean_repos: list[str]


def _layer(lay: OCILayoutWriter, blob: bytes, media_type: str, diff_id: str) -> Layer:
    return Layer(lay.add_blob(blob, media_type), diff_id)


def build_crafted(base: Path) -> Crafted:
    """A registry tree holding one image per defect, all pushed through the real registry
    (under `base`; the `crafted` fixture of tests/conftest.py)."""
    root = base / "root"
    lay = OCILayoutWriter(base / "layout")
    tar = make_tar({"etc/hello": b"hello\n", "usr/lib/blob.bin": pseudo_random_bytes("deep", 20000)})
    other_tar = make_tar({"etc/other": b"other\n"})
    good = _layer(lay, gzip.compress(tar, mtime=0), MT_OCI_LAYER_GZIP, sha256_digest(tar))
    expected: set[tuple[str, str, str]] = set()
    images: dict[str, list[Layer]] = {}
    config_override: dict[str, list[str]] = {}

    # 1. the config names the wrong uncompressed digest for a layer it shares with a good image
    wrong = _layer(lay, gzip.compress(other_tar, mtime=0), MT_OCI_LAYER_GZIP, sha256_digest(tar))
    images["deep/wrong-diffid"] = [good, wrong]
    expected.add(("layer_diff_id_mismatch", "deep/wrong-diffid", wrong.digest))
    # 2. gzip of bytes that are not a tar (its diff_id is right: only the tar check can tell)
    junk = pseudo_random_bytes("not a tar", 3000)
    not_tar = _layer(lay, gzip.compress(junk, mtime=0), MT_OCI_LAYER_GZIP, sha256_digest(junk))
    images["deep/not-tar"] = [not_tar]
    expected.add(("layer_not_tar", "deep/not-tar", not_tar.digest))
    # 3. a truncated gzip stream and 4. a truncated zstd stream (the zstd decoder is silent)
    cut_gz = _layer(lay, gzip.compress(tar, mtime=0)[:-30], MT_OCI_LAYER_GZIP, sha256_digest(tar))
    images["deep/truncated-gzip"] = [cut_gz]
    expected.add(("layer_decompress_error", "deep/truncated-gzip", cut_gz.digest))
    cut_zst = _layer(lay, zstandard.ZstdCompressor().compress(tar)[:-100], MT_OCI_LAYER_ZSTD,
                     sha256_digest(tar))
    images["deep/truncated-zstd"] = [cut_zst]
    expected.add(("layer_decompress_error", "deep/truncated-zstd", cut_zst.digest))
    # 5. gzip bytes labelled zstd: a warning, the content itself is fine
    mislabelled = _layer(lay, gzip.compress(tar, mtime=1), MT_OCI_LAYER_ZSTD, sha256_digest(tar))
    images["deep/mislabelled"] = [mislabelled]
    expected.add(("layer_compression_mismatch", "deep/mislabelled", mislabelled.digest))
    # 6. one diff_id for two layers
    images["deep/count"] = [good, _layer(lay, tar, MT_OCI_LAYER, sha256_digest(tar))]
    config_override["deep/count"] = [sha256_digest(tar)]
    # 7. clean: plain tar, and zstd in several frames plus a skippable frame (zstd:chunked-like)
    frames = (zstandard.ZstdCompressor(level=1).compress(tar[:4096])
              + zstandard.ZstdCompressor(level=5, write_checksum=True).compress(tar[4096:])
              + struct.pack("<II", 0x184D2A50, 4) + b"meta")
    chunked = _layer(lay, frames, MT_OCI_LAYER_ZSTD, sha256_digest(tar))
    images["deep/good"] = [good, _layer(lay, other_tar, MT_OCI_LAYER, sha256_digest(other_tar)),
                           chunked]

    with RealRegistry(root) as registry:
        for repo, layers in images.items():
            config = lay.add_config(layers)
            if repo in config_override:
                doc = json.loads(lay.read_blob(config["digest"]))
                doc["rootfs"]["diff_ids"] = config_override[repo]
                config = lay.add_blob(json.dumps(doc).encode(), config["mediaType"])
                expected.add(("config_diff_ids_invalid", repo, config["digest"]))
            manifest = lay.add_manifest({"schemaVersion": 2,
                                         "mediaType": "application/vnd.oci.image.manifest.v1+json",
                                         "config": config,
                                         "layers": [layer.descriptor for layer in layers]})
            registry.push_from_layout(lay, repo, manifest, "latest")
            assert registry.manifest_digest(repo, "latest") == manifest["digest"]
    return Crafted(root, expected, ["deep/good"])
