"""`regfsck import`: images from an OCI layout or archive into a stopped registry's tree."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from regfsck.cli.app import command
from regfsck.cli.common import (
    APPLY_OPTION,
    BREAK_LOCK_OPTION,
    CONFIG_OPTION,
    JSON_OPTION,
    NO_REGISTRY_CHECK_OPTION,
    REGISTRY_URL_OPTION,
    CtrlC,
    changes_tested_on,
    for_changes,
    human_bytes,
    plural,
    print_json,
    root_words,
    say,
    show_progress,
    split_root,
    stderr_console,
    styled,
    table,
    with_requests,
)
from regfsck.errors import ExitCode

if TYPE_CHECKING:
    from regfsck.importer import ImportResult
    from regfsck.root import RegistryRoot

@command("import")
def import_command(
    args: list[str] = typer.Argument(..., metavar="ROOT SOURCE", show_default=False, help=(
        "Registry storage root (holding docker/registry/v2), its v2 directory, an empty "
        "directory to start a registry in, or s3://BUCKET/PREFIX (omit it with --config); "
        "then the OCI image layout "
        "directory, or oci-archive (plain, .gz or .zst), e.g. from `regfsck export` or skopeo.")),
    config: Path | None = CONFIG_OPTION,
    repo: str | None = typer.Option(None, "--repo", metavar="REPO", help="Put every image into "
                                    "this repository (needed when the layout names only tags)."),
    apply: bool = APPLY_OPTION,
    json_output: bool = JSON_OPTION,
    registry_url: list[str] | None = REGISTRY_URL_OPTION,
    no_registry_check: bool = NO_REGISTRY_CHECK_OPTION,
    break_lock: bool = BREAK_LOCK_OPTION,
) -> None:
    """Import images offline, exactly as the registry would write them (plan first, --apply)."""
    from regfsck.cli.sweeping import show_recovered
    from regfsck.importer import run_import

    root_text, source_text = split_root(args, config, "SOURCE")
    source = Path(source_text)
    root = for_changes(_target(root_text, config), registry_url, no_registry_check, break_lock)
    changes_tested_on(root, "import", ("s3",), apply)
    ctrl_c = CtrlC()
    bar = _Bar() if show_progress(json_output) else None
    try:
        result = run_import(root if root.is_object_storage else root.root, source, repo=repo,
                            apply=apply,
                          on_bytes=bar.advance if bar else None, stop=ctrl_c.stop,
                          on_recovered=show_recovered(json_output))
    finally:
        ctrl_c.restore()
        if bar is not None:
            bar.stop()
    if json_output:
        print_json(with_requests(root, result.to_json()))
    else:
        render_plan(result, root)
    raise typer.Exit(ExitCode.OK)


def _target(root_text: Path | None, config: Path | None) -> RegistryRoot:
    """ROOT as given: a bucket (`s3://`, or a config with `storage: s3:`), else a local
    directory, which may still be empty (the importer judges it: `target_root`)."""
    from regfsck.layout import V2_PREFIX
    from regfsck.root import (
        RegistryRoot,
        S3Location,
        is_s3_url,
        object_root,
        parse_s3_url,
        root_from_config,
    )

    if root_text is not None and is_s3_url(root_text):
        return object_root(parse_s3_url(str(root_text)))
    where: Path | S3Location
    if root_text is not None:
        where = root_text
    else:
        assert config is not None  # split_root: ROOT or --config
        where = root_from_config(config)
    if isinstance(where, S3Location):
        return object_root(where)
    return RegistryRoot(where, where / V2_PREFIX)


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


def render_plan(result: ImportResult, root: RegistryRoot) -> None:
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
            f"`regfsck undo {root_words(root)} {result.run_id}"
            f"{' --registry-url URL' if root.is_object_storage else ''}`")
        say(done)
    else:
        say(f"plan: {what}. Nothing was written; run again with --apply "
            "(stop the registry first).")
