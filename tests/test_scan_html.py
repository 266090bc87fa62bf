"""`scan --html FILE`: one self-contained page, checked in a real browser (Debian's chromium,
headless): it renders without a single error (script errors, refused loads and
console.error are written into the DOM by the page's first script and read back with
--dump-dom), shows the fixture's repositories and its figures, draws the drill-down, and
names from the disk built to attack the page (markup, `</script>`) stay text."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from regfsck.cli.common import human_bytes
from tests.support import V2
from tests.support.cli import invoke as cli

HOSTILE = ["x<img src=x onerror=alert(1)>&amp;\"'", "q<"]  # one repository: x<img.../q<
SCRIPT_BREAKER = ["x<", "script><script>document.title='pwned'<", "script>"]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None,
                                    reason="chromium is not installed (Debian package chromium)")


def browser(*args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    return subprocess.run([CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox",
                           "--no-first-run", "--disable-extensions", "--hide-scrollbars",
                           "--enable-logging=stderr", "--v=0", *args],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HOME": os.environ.get("HOME", "/tmp")})


def dump_dom(page: Path, fragment: str = "") -> str:
    result = browser("--virtual-time-budget=5000", "--dump-dom", page.as_uri() + fragment)
    assert result.returncode == 0, result.stderr[-2000:]
    console = [line for line in result.stderr.splitlines() if ":CONSOLE" in line]
    assert not console, console
    return result.stdout


def add_repository(root: Path, parts: list[str], source: str = "a/b") -> str:
    """A copy of repository `source` under a hostile name (its blobs are shared, so the tree
    stays consistent); returns the name as regfsck reads it."""
    target = root / V2 / "repositories"
    for part in parts:
        target = target / part
    target.mkdir(parents=True)
    for sub in ("_manifests", "_layers"):
        shutil.copytree(root / V2 / "repositories" / source / sub, target / sub, symlinks=True)
    return "/".join(parts)


def age_tree(root: Path, days: int = 30) -> None:
    when = time.time() - days * 86400
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.utime(Path(dirpath) / name, (when, when), follow_symlinks=False)


def page_errors(dom: str) -> list[str]:
    """What the page's catcher recorded: the count on <html> and the #console-errors text."""
    root = re.search(r"<html[^>]*>", dom)
    assert root is not None
    listed = re.search(r'<pre id="console-errors"[^>]*>(.*?)</pre>', dom, re.S)
    assert listed is not None, "the page lost its error list"
    errors = [line for line in html.unescape(listed.group(1)).splitlines() if line]
    if "data-errors" in root.group(0) and not errors:
        errors = [root.group(0)]
    return errors


def text_of(dom: str) -> str:
    """The page's visible text, roughly: tags dropped, entities decoded."""
    return html.unescape(re.sub(r"<[^>]+>", " ", dom))


@pytest.fixture
def page(fixture_root: Path, tmp_path: Path) -> tuple[Path, Path, dict[str, object]]:
    hostile = add_repository(fixture_root, HOSTILE)
    breaker = add_repository(fixture_root, SCRIPT_BREAKER)
    # Untagged manifests for --delete-untagged: drop a tag of a/b/c (its revision stays).
    shutil.rmtree(fixture_root / V2 / "repositories/a/b/c/_manifests/tags/v2")
    age_tree(fixture_root)
    blobs = sorted((fixture_root / V2 / "blobs").rglob("data"), key=lambda p: p.stat().st_size)
    victim = blobs[-1]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    verify = cli("verify", str(fixture_root), "--json")
    assert verify.returncode == 1
    (tmp_path / "verify.json").write_text(verify.stdout)
    out = tmp_path / "report.html"
    result = cli("scan", str(fixture_root), "--html", str(out), "--findings", str(tmp_path / "verify.json"))
    assert result.returncode == 0, result.stderr
    assert f"HTML report written to {out}" in result.stderr
    scan = json.loads(cli("scan", str(fixture_root), "--json").stdout)
    facts: dict[str, object] = {"hostile": hostile, "breaker": breaker, "scan": scan,
                                "gc": json.loads(cli("gc", str(fixture_root), "--json").stdout),
                                "gc_untagged": json.loads(cli("gc", str(fixture_root), "--json",
                                                              "--delete-untagged").stdout),
                                "verify": json.loads(verify.stdout)}
    return out, fixture_root, facts


def test_page_is_self_contained(page: tuple[Path, Path, dict[str, object]]) -> None:
    out, _, _ = page
    text = out.read_text()
    assert not re.search(r"""(src|href|action)\s*=\s*["']?\s*(https?:|//|file:)""", text, re.I)
    assert "<link" not in text and "@import" not in text and "url(" not in text
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', text)
    assert csp and "default-src 'none'" in csp.group(1) and "unsafe-inline" not in csp.group(1)
    assert len(re.findall(r"<script[ >]", text)) == 3  # the catcher, the data, the treemap


@needs_chromium
def test_renders_in_chromium_without_errors(page: tuple[Path, Path, dict[str, object]],
                                            tmp_path: Path) -> None:
    out, _, facts = page
    dom = dump_dom(out)
    assert re.search(r'<html[^>]* data-ready="1"', dom), "the treemap script did not run to its end"
    assert page_errors(dom) == []
    assert "<title>pwned" not in dom  # the `</script>` name did not run as a script
    visible = text_of(dom)
    scan = facts["scan"]
    assert isinstance(scan, dict)
    for repo in scan["repositories"]:
        assert repo["name"] in visible, repo["name"]
    # The treemap drew one labelled box per repository (the fixture's are all large enough).
    svg = dom.split('id="map"', 1)[1].split("</svg>", 1)[0]
    assert svg.count("<g ") >= len(scan["repositories"])
    for name in ("a/b/c", "library/base", "multi/oci"):
        assert f"<title>{name}" in svg, name
    # Hostile names are text: no element came from them, and they read back verbatim.
    assert "<img" not in dom
    assert len(re.findall(r"<script[ >]", dom)) == 3
    assert str(facts["hostile"]) in visible and str(facts["breaker"]) in visible
    shot = tmp_path / "report.png"
    result = browser(f"--screenshot={shot}", "--window-size=1100,2600", out.as_uri())
    assert result.returncode == 0 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 20_000  # a blank page is a few KiB


@needs_chromium
def test_figures_on_the_page(page: tuple[Path, Path, dict[str, object]]) -> None:
    out, _, facts = page
    visible = " ".join(text_of(dump_dom(out)).split())
    gc, gc_untagged = facts["gc"], facts["gc_untagged"]
    assert isinstance(gc, dict) and isinstance(gc_untagged, dict)
    assert gc_untagged["reclaimable_bytes"] > gc["reclaimable_bytes"] > 0  # aged, untagged v2
    assert f"gc {human_bytes(gc['reclaimable_bytes'])} {len(gc['blobs'])} blobs" in visible
    assert (f"gc --delete-untagged {human_bytes(gc_untagged['reclaimable_bytes'])} "
            f"{len(gc_untagged['blobs'])} blobs") in visible
    assert "0f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f0" in visible  # the fixture's stale upload
    verify = facts["verify"]
    assert isinstance(verify, dict)
    assert "blob_digest_mismatch" in visible
    errors = verify["summary"]["errors"]
    assert f"{errors} error{'s' if errors != 1 else ''}" in visible


@needs_chromium
def test_drill_down_to_tags(page: tuple[Path, Path, dict[str, object]]) -> None:
    out, _, facts = page
    scan = facts["scan"]
    assert isinstance(scan, dict)
    names = [r["name"] for r in scan["repositories"]]
    index = names.index("library/base")
    dom = dump_dom(out, f"#repo={index}")
    assert page_errors(dom) == []
    crumb = re.search(r'id="crumb">([^<]*)<', dom)
    assert crumb and crumb.group(1) == "library/base"
    detail = text_of(dom.split('id="detail"', 1)[1].split("</table>", 1)[0])
    for tag in scan["repositories"][index]["tags"]:
        assert tag in detail, tag
    svg = dom.split('id="map"', 1)[1].split("</svg>", 1)[0]
    assert "shared with other repositories" in svg


def test_findings_file_errors_are_one_line(fixture_root: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"findings": [{"kind": 1}]}')
    for args, needle in (
            (["--html", str(tmp_path / "r.html"), "--findings", str(bad)], "not the output of"),
            (["--html", str(tmp_path / "r.html"), "--findings", str(tmp_path / "none.json")], "cannot read"),
            (["--findings", str(bad)], "goes with --html"),
            (["--html", str(tmp_path / "no/such/r.html")], "does not exist")):
        result = cli("scan", str(fixture_root), *args)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.count("\n") == 1 and needle in result.stderr, result.stderr
    assert not (tmp_path / "r.html").exists()


@needs_chromium
def test_many_repositories_group_by_namespace(fixture_root: Path, tmp_path: Path) -> None:
    """Past 30 repositories the first level groups them by their first path component;
    a group opens on its repositories, and a repository's back button leads to its group."""
    names = [add_repository(fixture_root, ["team", f"app{n:02d}"]) for n in range(32)]
    out = tmp_path / "many.html"
    result = cli("scan", str(fixture_root), "--html", str(out))
    assert result.returncode == 0, result.stderr
    top = dump_dom(out)
    assert page_errors(top) == []
    svg = top.split('id="map"', 1)[1].split("</svg>", 1)[0]
    assert "<title>team/ (32 repositories)" in svg
    assert "<title>team/app00" not in svg  # inside the group, not on the first level
    assert "<title>a/ (2 repositories)" in svg  # a/b and a/b/c
    assert "<title>compress/zstd" in svg  # a namespace of one repository: the repository itself
    group = dump_dom(out, "#group=team")
    assert page_errors(group) == []
    svg = group.split('id="map"', 1)[1].split("</svg>", 1)[0]
    assert all(f"<title>{name}" in svg for name in names)
    order = [r["name"] for r in json.loads(cli("scan", str(fixture_root), "--json").stdout)["repositories"]]
    index = order.index(names[3])
    inside = dump_dom(out, f"#repo={index}")
    assert re.search(r'id="crumb">team/app03<', inside)
    assert re.search(r'id="back"[^>]*>\u2190 team/<', inside)
