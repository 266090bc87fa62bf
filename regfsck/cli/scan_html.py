"""`scan --html FILE`: the disk map as one self-contained HTML page.

The page needs no network when viewed: CSS, JavaScript and the treemap's data are inline,
and its Content-Security-Policy forbids loading anything (scripts and styles are allowed by
their sha256, so even a name that slipped through escaping could not run as a script).
Every name from the disk (or from a verify JSON) is escaped: as HTML text in the tables,
and as JSON with `<`, `>` and `&` as \\u escapes inside the data block, which the script
only ever puts into the page with `textContent`.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import os
import tempfile
from collections.abc import Sequence
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

from regfsck import __version__
from regfsck.cli.common import fail, human_bytes
from regfsck.diskmap import DiskMap
from regfsck.errors import ExitCode
from regfsck.findings import safe_text

FINDINGS_ROWS = 2000
KEYS = ("severity", "kind", "path", "message")


def h(text: object) -> str:
    """Any text for HTML: printable (control and undecodable bytes as \\xNN) and escaped."""
    return html.escape(safe_text(str(text)), quote=True)


def load_findings(path: Path) -> list[dict[str, Any]]:
    """The findings of `verify --json` (the whole object, or just its findings list)."""
    try:
        doc = json.loads(path.read_bytes())
    except OSError as exc:
        fail(f"--findings: cannot read {path}: {exc.strerror or exc}", ExitCode.USAGE)
    except ValueError as exc:
        fail(f"--findings: {path} is not JSON: {exc}", ExitCode.USAGE)
    findings = doc.get("findings") if isinstance(doc, dict) else doc
    if not isinstance(findings, list) or not all(
            isinstance(f, dict) and all(isinstance(f.get(k), str) for k in KEYS) for f in findings):
        fail(f"--findings: {path} is not the output of `regfsck verify --json`", ExitCode.USAGE)
    return findings


def _data(disk: DiskMap) -> dict[str, Any]:
    """What the treemap script draws (every string made printable; escaped when embedded)."""
    s = disk.scan
    return {
        "repos": [{
            "name": safe_text(r.name), "unique": r.unique_bytes, "shared": r.shared_bytes,
            "parts": [{"kind": p.kind, "label": safe_text(p.label), "bytes": p.bytes} for p in r.parts],
            "images": [{"tags": [safe_text(t) for t in i.tags], "digest": i.digest, "bytes": i.bytes,
                        "only": i.only_bytes} for i in r.images],
        } for r in disk.repos],
        "extra": [{"label": "unreferenced blobs", "bytes": s.unreferenced_bytes},
                  {"label": "uploads", "bytes": sum(u.size for u in s.uploads)}],
    }


def _embed_json(data: Any) -> str:
    text = json.dumps(data, ensure_ascii=True, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _asset(name: str) -> str:
    """The page's script and style, shipped as package data beside this module."""
    return resources.files("regfsck.cli").joinpath("html", name).read_text(encoding="utf-8")


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def _table(headers: tuple[str, ...], rows: Sequence[tuple[str, ...]], numeric: set[int] | None = None,
           empty: str = "none") -> str:
    """A table from already-escaped cells."""
    if not rows:
        return f'<p class="none">{h(empty)}</p>'
    numeric = numeric or set()
    head = "".join(f'<th{" class=num" if i in numeric else ""}>{h(c)}</th>'
                   for i, c in enumerate(headers))
    body = "".join("<tr>" + "".join(f'<td{" class=num" if i in numeric else ""}>{c}</td>'
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _short(digest: str) -> str:
    algo, _, hexpart = digest.partition(":")
    return f'<code class="id" title="{h(digest)}">{h(algo)}:{h(hexpart[:12])}</code>'


def _gc_section(disk: DiskMap) -> str:
    cards = []
    per_repo: dict[str, dict[str, int]] = {}
    for outlook in disk.gc:
        plan = outlook.plan
        flag = "gc" if outlook.mode == "default" else "gc --delete-untagged"
        blocked = (f'<p class="bad">gc refuses: {len(plan.blocked)} findings make marking '
                   "unreliable (run verify)</p>" if plan.is_blocked else "")
        cards.append(
            f'<div class="card"><h3><code>{h(flag)}</code></h3>'
            f'<p class="big">{h(human_bytes(plan.reclaimable_bytes))}</p>'
            f"<p>{len(plan.blobs)} blobs, {len(plan.manifests)} manifests, {len(plan.uploads)} "
            f"uploads, {len(plan.tag_dirs)} tag dirs, {len(plan.repositories)} repositories; "
            f"{len(plan.young)} kept by the grace period</p>{blocked}</div>")
        for name, usage in plan.per_repository.items():
            per_repo.setdefault(name, {})[outlook.mode] = usage.reclaimable_bytes
    rows = [(h(name), h(human_bytes(m.get("default", 0))), h(human_bytes(m.get("delete_untagged", 0))))
            for name, m in sorted(per_repo.items(), key=lambda i: -max(i[1].values()))]
    return ('<section id="gc"><h2>What gc would reclaim</h2>'
            "<p>Planned read-only with gc's defaults (grace 1h, uploads older than 7d); nothing "
            "changes without <code>--apply</code>, and then only into the quarantine.</p>"
            f'<div class="cards">{"".join(cards)}</div>'
            + _table(("repository", "gc", "gc --delete-untagged"), rows, {1, 2},
                     "nothing to reclaim in either mode") + "</section>")


def _findings_section(findings: list[dict[str, Any]] | None) -> str:
    if findings is None:
        return ('<section id="findings"><h2>verify findings</h2><p class="none">No verify report '
                "given (<code>regfsck verify ROOT --json &gt; verify.json</code>, then "
                "<code>scan --html FILE --findings verify.json</code>).</p></section>")
    counts: dict[str, int] = {}
    for f in findings:
        counts[f["severity"]] = counts.get(f["severity"], 0) + 1
    names = {"error": "error", "warning": "warning", "info": "note"}
    order = {"error": 0, "warning": 1, "info": 2}
    summary = ", ".join(f"{n} {h(names.get(sev, sev))}{'s' if n != 1 else ''}"
                        for sev, n in sorted(counts.items(), key=lambda i: order.get(i[0], 3)))
    summary = summary or "no findings"
    rows = []
    for f in findings[:FINDINGS_ROWS]:
        where = f.get("repo") or ""
        if f.get("tag"):
            where += f":{f['tag']}"
        rows.append((f'<span class="sev-{h(f["severity"])}">{h(f["severity"])}</span>',
                     f'<code class="id">{h(f["kind"])}</code>', h(where), f"<code>{h(f['path'])}</code>",
                     h(f["message"])))
    more = (f"<p>... and {len(findings) - FINDINGS_ROWS} more (see the JSON)</p>"
            if len(findings) > FINDINGS_ROWS else "")
    return (f'<section id="findings"><h2>verify findings</h2><p>{summary}</p>'
            + _table(("severity", "kind", "where", "path", "message"), rows, empty="verify found nothing")
            + more + "</section>")


def render_html(disk: DiskMap, *, root: str, generated: datetime, top: int,
                findings: list[dict[str, Any]] | None) -> str:
    s = disk.scan
    stale_bytes = sum(u.size for u in disk.stale_uploads)
    totals = [
        ("blobs on disk", f"{s.blob_count} ({human_bytes(s.blob_bytes)})"),
        ("repositories", str(len(disk.repos))),
        ("tags", str(sum(len(r.tags) for r in s.repositories))),
        ("unreferenced blobs", f"{s.unreferenced_count} ({human_bytes(s.unreferenced_bytes)})"),
        ("stale uploads", f"{len(disk.stale_uploads)} ({human_bytes(stale_bytes)})"),
        ("dedup ratio", f"{s.dedup_ratio:.2f}x"),
    ]
    totals_html = "".join(f'<div class="card"><div class="k">{h(k)}</div><div class="v">{h(v)}</div></div>'
                          for k, v in totals)
    repo_rows = [(f'<a href="#" data-repo="{i}">{h(r.name)}</a>', str(len(r.images)), str(r.manifests),
                  h(human_bytes(r.unique_bytes)), h(human_bytes(r.shared_bytes)))
                 for i, r in enumerate(disk.repos)]
    image_rows = [(h(i.repo), h(", ".join(i.tags)), _short(i.digest), h(human_bytes(i.bytes)),
                   h(human_bytes(i.only_bytes))) for i in disk.images[:top]]
    upload_rows = [(h(u.repo), f"<code>{h(u.id)}</code>", h(human_bytes(u.size)),
                    h(u.started_at or "never (no startedat)")) for u in disk.stale_uploads]
    body = f"""
<header><h1>Where the disk went</h1>
<p>regfsck {h(__version__)} scan of <code>{h(root)}</code>,
{h(generated.strftime("%Y-%m-%d %H:%M:%S %Z"))}</p></header>
<div class="cards">{totals_html}</div>
<section id="treemap"><h2>Disk use by repository</h2>
<p>Area is the bytes a repository uses: <span class="sw unique"></span> only this repository,
<span class="sw shared"></span> shared with others (counted in each; on disk once).
Click a repository (or its name below) for its tags.</p>
<p id="legend" hidden><span class="sw tag"></span> only this tag's image needs it
<span class="sw tags"></span> several tags of this repository <span class="sw shared"></span> other
repositories too <span class="sw untagged"></span> only untagged manifests or layer links</p>
<nav><button id="back" type="button" hidden>&larr; all repositories</button> <span id="crumb"></span></nav>
<svg id="map" viewBox="0 0 960 440" role="img" aria-label="treemap of disk use"></svg>
<div id="detail"></div>
{_table(("repository", "tagged images", "manifests", "unique", "shared"), repo_rows, {1, 2, 3, 4},
        "no repositories")}
</section>
<section id="images"><h2>Largest images</h2>
<p>Every blob a tagged image needs (manifest, config, layers, index children); "only this image":
what no other tagged image needs.</p>
{_table(("repository", "tags", "digest", "size", "only this image"), image_rows, {3, 4}, "no tagged images")}
</section>
{_gc_section(disk)}
<section id="uploads"><h2>Stale uploads</h2>
{_table(("repository", "upload", "size", "started"), upload_rows, {2}, "no stale uploads")}
</section>
{_findings_section(findings)}
<pre id="console-errors" hidden></pre>
"""
    catcher, script, style = (_asset(name) for name in ("catcher.js", "scan.js", "scan.css"))
    csp = (f"default-src 'none'; script-src {_csp_hash(catcher)} {_csp_hash(script)}; "
           f"style-src {_csp_hash(style)}; img-src data:; base-uri 'none'; form-action 'none'")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>regfsck: {h(root)}</title>
<script>{catcher}</script>
<style>{style}</style>
</head><body>{body}
<script type="application/json" id="data">{_embed_json(_data(disk))}</script>
<script>{script}</script>
</body></html>
"""


def write_html(path: Path, text: str) -> None:
    """Whole or nothing (temp file beside it, then rename); a failure is one line, exit 3."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        fail(f"--html: cannot write {path}: {exc.strerror or exc}")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        fail(f"--html: cannot write {path}: {exc.strerror or exc}")
