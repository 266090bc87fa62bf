"""The operator's day (issue 13): from a failing pull to the fix, through the CLI as people
and scripts meet it: `python -m regfsck` at 80 columns, piped, and in a pseudo-terminal.

Expected values come from `fixtures/registry.json`, which `fixtures/regenerate.py` recorded
from the real registry (the manifests it served and their references), never from
regfsck's own graph code.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import shutil
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from regfsck import layout
from tests import realtools
from tests.hostile import unprivileged_prefix
from tests.support import REPO_ROOT
from tests.support.cli import command as regfsck_argv
from tests.support.cli import invoke
from tests.support.cli import run as run_cli

META = json.loads((REPO_ROOT / "fixtures" / "registry.json").read_text())
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
FULL_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def env80(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("REGFSCK_DEBUG", "NO_COLOR", "FORCE_COLOR") and not k.startswith("REGISTRY_")}
    env.update({"COLUMNS": "80", "PYTHONPATH": str(REPO_ROOT), "TERM": "xterm-256color"}, **extra)
    return env


def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """regfsck with stdout and stderr not terminals (as `regfsck ... > plan.txt` or `| grep`)."""
    return invoke(*args, env=env80(**env))


def tty(*args: str, columns: int = 80, **env: str) -> tuple[int, str]:
    """regfsck in a pseudo-terminal of `columns` columns: (exit code, everything it showed)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    environment = env80(**env)
    environment.pop("COLUMNS")
    proc = subprocess.Popen(regfsck_argv(*args), stdin=slave, stdout=slave, stderr=slave, env=environment,
                            close_fds=True)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    code = proc.wait(timeout=300)
    return code, b"".join(chunks).decode("utf-8", "replace").replace("\r\n", "\n")


def tags_needing(blob: str) -> set[str]:
    """Every repo:tag whose image needs `blob`, from what the real registry served."""
    refs: dict[str, list[str]] = META["references"]
    children: dict[str, list[str]] = META["index_children"]
    needing = set()
    for repo, tags in META["api"]["tags"].items():
        for tag, target in tags.items():
            manifests = [target, *children.get(target, [])]
            if blob in manifests or any(blob in refs.get(m, []) for m in manifests):
                needing.add(f"{repo}:{tag}")
    return needing


def corrupt(root: Path, digest: str) -> Path:
    """Flip the first byte of a blob (same size: only re-hashing finds it)."""
    data = root / layout.V2_PREFIX / layout.blob_data(digest)
    raw = bytearray(data.read_bytes())
    raw[0] ^= 0xFF
    data.write_bytes(bytes(raw))
    return data


BASE = META["blobs"]["layer/base"]  # shared by several repositories and an index


# -- from symptom to fix -------------------------------------------------------------------


def test_blob_findings_name_every_tag_that_needs_the_blob(fixture_root: Path) -> None:
    expected = tags_needing(BASE)
    assert len({t.split(":")[0] for t in expected}) >= 3  # the point: several repositories
    corrupt(fixture_root, BASE)
    done = cli("verify", str(fixture_root), "--json")
    assert done.returncode == 1
    [mismatch] = [f for f in json.loads(done.stdout)["findings"]
                  if f["kind"] == "blob_digest_mismatch"]
    assert set(mismatch["affected_tags"]) == expected


@pytest.mark.realtools
def test_affected_tags_are_exactly_the_tags_the_real_registry_cannot_serve(
        fixture_root: Path, running_registry: type[realtools.RealRegistry], tmp_path: Path) -> None:
    """The seed symptom: clients fail to pull. Every tag skopeo cannot copy (all platforms)
    from the real registry serving the damaged tree is in affected_tags, and no other."""
    corrupt(fixture_root, BASE)
    [mismatch] = [f for f in json.loads(cli("verify", str(fixture_root), "--json").stdout)["findings"]
                  if f["kind"] == "blob_digest_mismatch"]
    failing = set()
    with running_registry(fixture_root) as registry:
        for repo, tags in META["api"]["tags"].items():
            for tag in tags:
                try:
                    realtools.skopeo_copy(f"docker://{registry.host}/{repo}:{tag}",
                                          f"oci:{tmp_path / 'out'}:{len(failing)}", "--all")
                except realtools.RealToolError:
                    failing.add(f"{repo}:{tag}")
    assert failing and set(mismatch["affected_tags"]) == failing


def test_size_mismatch_names_every_tag(fixture_root: Path) -> None:
    data = fixture_root / layout.V2_PREFIX / layout.blob_data(BASE)
    data.write_bytes(data.read_bytes()[:-10])  # truncated: the classic `unexpected EOF`
    done = cli("verify", str(fixture_root), "--json", "--no-data")
    [size] = [f for f in json.loads(done.stdout)["findings"] if f["kind"] == "blob_size_mismatch"]
    assert set(size["affected_tags"]) == tags_needing(BASE)


def test_verify_ends_with_the_commands_to_run(fixture_root: Path) -> None:
    corrupt(fixture_root, BASE)
    done = cli("verify", str(fixture_root))
    assert done.returncode == 1
    assert f"regfsck repair {fixture_root} --from BACKUP --apply" in done.stderr
    assert f"regfsck repair {fixture_root} --apply" in done.stderr
    pushed = done.stderr.split("then push again: ", 1)[1].split("\n", 1)[0].split()
    assert set(pushed) == tags_needing(BASE)
    quiet = cli("verify", str(fixture_root), "-q")
    assert "repair" not in quiet.stderr and quiet.returncode == 1
    clean = cli("verify", str(fixture_root.parent / "missing"))
    assert clean.returncode == 3


def test_short_digests_as_git_takes_them(fixture_root: Path) -> None:
    digest = META["blobs"]["layer/a-b"]
    full = json.loads(cli("why", str(fixture_root), digest, "--json").stdout)
    for short in (digest[7:15], digest[:15]):
        done = cli("why", str(fixture_root), short, "--json")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == full
    repo, _tag, manifest = META["oci_index"]
    seen = cli("inspect", str(fixture_root), f"{repo}@{manifest[:15]}", "--no-data", "--json")
    assert seen.returncode == 0 and json.loads(seen.stdout)["digest"] == manifest
    plan = cli("rm", str(fixture_root), f"{repo}@{manifest[7:15]}", "--json")
    assert plan.returncode == 0 and [m["digest"] for m in json.loads(plan.stdout)["manifests"]] == [manifest]
    # a second blob directory sharing the prefix: ambiguous, one line, exit 2
    twin = fixture_root / layout.V2_PREFIX / layout.blob_data(digest[:15] + "0" * 56)
    twin.parent.mkdir(parents=True)
    twin.write_bytes(b"x")
    for args in (("why", str(fixture_root), digest[7:15]),
                 ("why", str(fixture_root), "sha256:0000abcd"),
                 ("inspect", str(fixture_root), f"{repo}@sha256:ffffffff")):
        done = cli(*args)
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "ambiguous" in cli("why", str(fixture_root), digest[7:15]).stderr


def test_why_says_a_truncated_blob_is_truncated(fixture_root: Path) -> None:
    data = fixture_root / layout.V2_PREFIX / layout.blob_data(BASE)
    size = data.stat().st_size
    data.write_bytes(data.read_bytes()[: size // 2])
    done = cli("why", str(fixture_root), BASE)
    assert done.returncode == 1 and "TRUNCATED" in done.stdout and str(size) in done.stdout
    report = json.loads(cli("why", str(fixture_root), BASE, "--json").stdout)
    assert (report["damage"], report["expected_size"]) == ("truncated", size)


# -- wrong hints -----------------------------------------------------------------------------


def test_rm_leaving_untagged_manifests_points_at_delete_untagged(fixture_root: Path) -> None:
    done = cli("rm", str(fixture_root), "a/b:latest", "--apply")
    assert done.returncode == 0, done.stderr
    assert "frees 0 B;" in done.stdout
    assert f"regfsck gc {fixture_root} --delete-untagged --apply" in done.stderr
    assert f"regfsck gc {fixture_root} --apply" not in done.stderr


def test_gc_suggests_purging_its_own_run_only(fixture_root: Path) -> None:
    done = cli("gc", str(fixture_root), "--grace", "0", "--apply")  # the stale upload goes
    assert done.returncode == 0, done.stderr
    run_id = json.loads(cli("runs", str(fixture_root), "--json").stdout)["runs"][-1]["run_id"]
    other = json.loads(cli("rm", str(fixture_root), "a/b:latest", "--apply", "--json").stdout)["run_id"]
    assert "Reclaimed" not in done.stdout and "Moved to quarantine:" in done.stdout
    assert f"freed once purged: regfsck purge {fixture_root} {run_id} --apply" in done.stdout
    assert "--older-than 0" not in done.stdout + done.stderr
    assert f"regfsck purge {fixture_root} {run_id} --apply" in done.stderr
    purged = cli("purge", str(fixture_root), run_id, "--apply")
    assert purged.returncode == 0 and "Deleted 1 run:" in purged.stdout
    left = [r["run_id"] for r in json.loads(cli("runs", str(fixture_root), "--json").stdout)["runs"]]
    assert left == [other]
    unknown = cli("purge", str(fixture_root), "20000101T000000.000000Z-abcdef", "--apply")
    assert unknown.returncode == 3 and "no run" in unknown.stderr


def test_repair_names_the_index_tag_for_a_lost_child(fixture_root: Path) -> None:
    repo, tag, index = META["oci_index"]
    child = META["index_children"][index][0]
    corrupt(fixture_root, child)
    plan = json.loads(cli("repair", str(fixture_root), "--json").stdout)
    [lost] = [b for b in plan["lost_blobs"] if b["digest"] == child]
    assert lost["images"] == [f"{repo}:{tag}"]
    human = cli("repair", str(fixture_root))
    assert "\\x0a" not in human.stdout and "repush" not in human.stdout + human.stderr
    assert f"{repo}:{tag}" in human.stdout and f"{repo}@{child}" not in human.stdout


# -- output people can read and grep -------------------------------------------------------


def test_piped_plan_holds_every_full_digest_on_one_line(fixture_root: Path) -> None:
    cli("rm", str(fixture_root), "a/b:latest", "--apply")
    args = ("gc", str(fixture_root), "--delete-untagged", "--grace", "0")
    plan = json.loads(cli(*args, "--json").stdout)
    digests = [b["digest"] for b in plan["blobs"]]
    assert digests
    text = cli(*args).stdout
    for digest in digests:
        assert f"blob\t{digest}\t" in text  # one record per line, the digest whole
    code, screen = tty(*args)
    assert code == 0
    assert not FULL_DIGEST.search(ANSI.sub("", screen))  # 12-hex short ids on a terminal
    assert digests[0][:19] in ANSI.sub("", screen)


def test_paths_and_names_are_never_markup(tmp_path: Path, fixture_root: Path) -> None:
    root = tmp_path / "[red]reg[bold]"
    shutil.move(fixture_root, root)
    done = cli("rm", str(root), "a/b:latest", "--apply")
    assert done.returncode == 0, done.stderr
    assert f"regfsck undo '{root}' " in done.stderr
    code, screen = tty("runs", str(root))
    assert code == 0 and "[red]reg[bold]" in ANSI.sub("", screen)
    out = tmp_path / "out[bold]x[red].tar"
    exported = cli("export", str(root), "library/base:1", "-o", str(out))
    assert exported.returncode == 0, exported.stderr
    assert str(out) in exported.stdout and out.is_file()


@pytest.mark.parametrize("command", ["scan", "verify", "gc", "rm", "why", "inspect", "repair",
                                     "export", "import", "runs", "undo", "purge"])
def test_help_reads_like_a_man_page(command: str) -> None:
    done = cli(command, "--help")
    assert done.returncode == 0, done.stderr
    text = done.stdout
    for bad in ("<bool>", "<list[", "<path>", "<int>", "<str>", "[default: 0]", "Traceback"):
        assert bad not in text, (bad, text)
    usage = text.splitlines()[0]
    assert "{" not in usage
    assert usage.startswith(f"Usage: regfsck {command} [OPTIONS]")
    assert all(len(line) <= 80 for line in text.splitlines())
    if command != "import" and command != "export" and command != "why" and command != "inspect":
        assert "ROOT" in usage
    assert "--config" in text and "-q, --quiet" in text and "--no-color" in text


def test_inspect_help_with_brackets_and_scan_top() -> None:
    assert "OS/ARCH[/VARIANT]" in cli("inspect", "--help").stdout
    scan = cli("scan", "--help").stdout
    assert "--top N" in scan and "largest" in scan


def test_units_and_plurals(fixture_root: Path) -> None:
    done = cli("verify", str(fixture_root))
    last = done.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"0 errors, 2 warnings, 1 note; \d+ blobs re-hashed \(\d+\.\d KiB\)", last)
    link = fixture_root / layout.V2_PREFIX / layout.tag_current_link("a/b", "latest")
    link.write_bytes(link.read_bytes() + b"\n")
    found = cli("verify", str(fixture_root), "--no-data")
    assert "1 error," in found.stdout and "b'" not in found.stdout
    assert '\\n"' in found.stdout


# -- the command line -----------------------------------------------------------------------


def test_config_on_every_command_that_takes_root(fixture_root: Path, tmp_path: Path) -> None:
    config = tmp_path / "config.yml"
    config.write_text(f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {fixture_root}\n")
    digest = META["blobs"]["layer/a-b"]
    assert cli("why", "--config", str(config), digest).returncode == 0
    assert cli("inspect", "-c", str(config), "a/b:latest", "--no-data").returncode == 0
    out = tmp_path / "a-b.tar"
    assert cli("export", "--config", str(config), "a/b:latest", "-o", str(out)).returncode == 0
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    config2 = tmp_path / "fresh.yml"
    config2.write_text(f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {fresh}\n")
    imported = cli("import", "--config", str(config2), str(out), "--apply")
    assert imported.returncode == 0, imported.stderr
    assert cli("verify", "--config", str(config2)).returncode == 0


def test_root_forgotten_or_unreadable(fixture_root: Path) -> None:
    done = cli("rm", "app/web:stable")
    assert done.returncode == 2 and "ROOT is missing" in done.stderr
    assert done.stderr.count("\n") == 1
    prefix = unprivileged_prefix()
    if prefix is None:
        pytest.skip("cannot drop the capabilities that let root read anything (no setpriv)")
    locked = fixture_root.parent / "locked"
    locked.mkdir(mode=0o000)
    try:
        for command in ("verify", "scan", "gc"):
            run = run_cli(command, str(locked / "root"), prefix=prefix, env=env80(), timeout=120)
            assert run.returncode == 3, run.stderr
            assert run.stderr.count("\n") == 1 and run.stderr.startswith("regfsck: "), run.stderr
    finally:
        locked.chmod(0o755)


def test_json_errors_are_json(fixture_root: Path) -> None:
    missing = cli("verify", str(fixture_root / "nope"), "--json")
    assert missing.returncode == 3
    error = json.loads(missing.stdout)
    assert error["exit_code"] == 3 and "does not exist" in error["error"]
    usage = cli("verify", str(fixture_root), "--json", "--jobs", "many")
    assert usage.returncode == 2 and json.loads(usage.stdout)["exit_code"] == 2
    bad = cli("why", str(fixture_root), "zz", "--json")
    assert bad.returncode == 2 and "digest" in json.loads(bad.stdout)["error"]


@pytest.mark.slow  # over a second (--durations)
def test_no_color_and_no_color_env_remove_every_style(fixture_root: Path) -> None:
    corrupt(fixture_root, BASE)
    code, styled = tty("verify", str(fixture_root))
    assert ANSI.search(styled), "a terminal gets styles"
    for args, env in ((("--no-color",), {}), ((), {"NO_COLOR": "1"})):
        code, plain = tty("verify", str(fixture_root), *args, **env)
        assert code == 1 and not re.search(r"\x1b\[[0-9;]*m", plain), plain


def test_shell_completion_and_man_page(tmp_path: Path) -> None:
    done = run_cli(env=env80(_REGFSCK_COMPLETE="complete_bash", COMP_WORDS="regfsck ve",
                             COMP_CWORD="1"), timeout=60)
    assert "verify" in done.stdout.split()
    page = subprocess.run([sys.executable, "-m", "regfsck.cli.manpage"], capture_output=True,
                          text=True, env=env80(), timeout=60, check=True).stdout
    assert page.startswith(".TH REGFSCK 1")
    for name in ("scan", "verify", "gc", "rm", "why", "inspect", "repair", "export", "import",
                 "runs", "undo", "purge"):
        assert f".SS regfsck {name}\n" in page
    if shutil.which("groff") is None:
        pytest.skip("groff is not installed: the page was generated but not rendered")
    rendered = subprocess.run(["groff", "-man", "-Tutf8", "-ww"], input=page, capture_output=True,
                              text=True, timeout=60, check=False)
    assert rendered.returncode == 0 and rendered.stderr == "", rendered.stderr
    assert "--delete-untagged" in re.sub(r".\x08", "", rendered.stdout)


# -- awareness -------------------------------------------------------------------------------


def test_verify_says_another_regfsck_holds_the_lock(fixture_root: Path) -> None:
    from regfsck.root import locate
    from regfsck.safety import RootLock

    with RootLock(locate(fixture_root)):
        done = cli("verify", str(fixture_root), "--no-data")
    assert "another regfsck run is changing" in done.stderr
    assert "show up as findings" in done.stderr


def test_import_checks_free_space_first(tmp_path: Path) -> None:
    from regfsck.importer import ImportFailed, check_free_space

    with pytest.raises(ImportFailed, match="not enough free space"):
        check_free_space(tmp_path, 1 << 62)
    check_free_space(tmp_path / "not" / "yet", 1)


def test_a_run_that_cannot_write_its_metadata_leaves_nothing(fixture_root: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from regfsck import quarantine
    from regfsck.root import locate
    from regfsck.session import mutation_session
    from regfsck.storage import StorageError

    def full(*args: object, **kwargs: object) -> None:
        raise StorageError(errno.ENOSPC, "No space left on device", "meta.json")

    monkeypatch.setattr(quarantine, "_write_meta", full)
    registry = locate(fixture_root)
    with pytest.raises(quarantine.QuarantineError, match="No space left"), \
            mutation_session(registry, command="gc") as session:
        quarantine.Run.begin(session, {})
    assert quarantine.list_runs(registry) == []
