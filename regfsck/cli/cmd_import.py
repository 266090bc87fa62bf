"""`regfsck import`: images from an OCI layout or archive into a stopped registry's tree."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from regfsck.cli.app import command
from regfsck.cli.common import (
    APPLY_OPTION,
    CONFIG_OPTION,
    JSON_OPTION,
    CtrlC,
    human_bytes,
    plural,
    print_json,
    say,
    show_progress,
    split_root,
    stderr_console,
    styled,
    table,
)
from regfsck.errors import ExitCode

if TYPE_CHECKING:
    from regfsck.importer import ImportResult

@command("import")
def import_command(
    args: list[str] = typer.Argument(..., metavar="ROOT SOURCE", show_default=False, help=(
        "Registry storage root (holding docker/registry/v2), its v2 directory, or an empty "
        "directory to start a registry in (omit it with --config); then the OCI image layout "
        "directory, or oci-archive (plain, .gz or .zst), e.g. from `regfsck export` or skopeo.")),
    config: Path | None = CONFIG_OPTION,
    repo: str | None = typer.Option(None, "--repo", metavar="REPO", help="Put every image into "
                                    "this repository (needed when the layout names only tags)."),
    apply: bool = APPLY_OPTION,
    json_output: bool = JSON_OPTION,
) -> None:
    """Import images offline, exactly as the registry would write them (plan first, --apply)."""
    from regfsck.cli.sweeping import show_recovered
    from regfsck.importer import run_import
    from regfsck.root import rootdir_from_config

    root, source_text = split_root(args, config, "SOURCE")
    source = Path(source_text)
    if root is None:
        assert config is not None
        root = rootdir_from_config(config)
    ctrl_c = CtrlC()
    bar = _Bar() if show_progress(json_output) else None
    try:
        result = run_import(root, source, repo=repo, apply=apply,
                          on_bytes=bar.advance if bar else None, stop=ctrl_c.stop,
                          on_recovered=show_recovered(json_output))
    finally:
        ctrl_c.restore()
        if bar is not None:
            bar.stop()
    if json_output:
        print_json(result.to_json())
    else:
        render_plan(result)
    raise typer.Exit(ExitCode.OK)


class _Bar:
    """Bytes read and verified so far (the total is unknown until the source is read)."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

        self.progress = Progress(TextColumn("reading and verifying"), BarColumn(),
                                 DownloadColumn(binary_units=True), console=stderr_console(),
                                 transient=True)
        self.task = self.progress.add_task("import", total=None)
        self.progress.start()

    def advance(self, nbytes: int) -> None:
        self.progress.advance(self.task, nbytes)

    def stop(self) -> None:
        self.progress.stop()


def render_plan(result: ImportResult) -> None:
    import shlex

    plan = result.plan
    table(f"Images in {plan.source}", ("repository", "tag", "digest"),
          [(image.repo, image.tag or "(by digest)", image.digest) for image in plan.images])
    kinds: dict[str, int] = {}
    for link in plan.links:
        kinds[link.kind] = kinds.get(link.kind, 0) + 1
    for note_text in plan.notes:
        say(styled("note: ", "yellow"), note_text)
    links = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items())) or "none"
    what = (f"{plural(len(plan.new_blobs), 'new blob')} ({human_bytes(plan.bytes_to_write)}), "
            f"{len(plan.existing_blobs)} already in the tree; links: {links}")
    if result.applied:
        done = "nothing to do: the tree already has all of it" if plan.is_empty else (
            f"imported into {plan.root}: {what}; undo with "
            f"`regfsck undo {shlex.quote(str(plan.root))} {result.run_id}`")
        say(done)
    else:
        say(f"plan: {what}. Nothing was written; run again with --apply "
            "(stop the registry first).")
