"""What the tests share: running the CLI, snapshotting trees, building small trees.

One place for each, so a test module never imports another test module and a change to how
regfsck is started (environment, timeout, in-process or not) is made once:

- `tests.support.cli`: `run` (a real `python -m regfsck` process: signals, exit codes of the
  interpreter, file descriptors, real pipes) and `invoke` (typer's in-process `CliRunner`,
  no interpreter start-up: for everything that does not test a process).
- `tests.support.snapshot`: every path of a tree with kind, content, mode and mtime, to say
  "nothing changed" or "undo restored it all".
- `tests.support.tree`: small v2 trees from a spec (path -> bytes), blobs and links.
- `tests.support.objectstore`: moto (S3) and Azurite servers, the real registry on a bucket or
  container, filled buckets, clones, snapshots, and the store-vs-disk-mirror `differential`.
"""

from __future__ import annotations

from pathlib import Path

# Spelled here, not taken from regfsck.layout: the tests state the registry's layout
# independently of the code they check.
V2 = "docker/registry/v2"
REPO_ROOT = Path(__file__).resolve().parent.parent.parent

__all__ = ["REPO_ROOT", "V2"]
