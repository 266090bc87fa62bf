"""Name grammars of the registry: repository names, tags and upload ids.

The patterns follow the reference grammar the registry validates with; a directory
that breaks them makes the official GC abort, so they are worth checking offline.
"""

from __future__ import annotations

import re

PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
DOMAIN = (
    rf"(?:{DOMAIN_COMPONENT}(?:\.{DOMAIN_COMPONENT})*"
    r"|\[[a-fA-F0-9:]+\])"
    r"(?::[0-9]+)?"
)
REPO_NAME_RE = re.compile(rf"(?:{DOMAIN}/)?{PATH_COMPONENT}(?:/{PATH_COMPONENT})*")
TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
UPLOAD_ID_RE = re.compile(
    r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
)
MAX_REPO_NAME_LENGTH = 255


def repo_name_problem(name: str) -> str | None:
    """Return why `name` is not a valid repository name, or None when it is."""
    if not name:
        return "empty repository name"
    if "\x00" in name or name.startswith("/") or any(p in (".", "..") for p in name.split("/")):
        return "repository name would escape the tree"
    if REPO_NAME_RE.fullmatch(name) is None:
        return "repository name breaks the reference grammar"
    if len(name) > MAX_REPO_NAME_LENGTH:
        return f"repository name longer than {MAX_REPO_NAME_LENGTH} characters"
    return None


def is_valid_repo_name(name: str) -> bool:
    """True when the registry would accept `name` as a repository name."""
    return repo_name_problem(name) is None


def is_valid_tag(tag: str) -> bool:
    """True when `tag` matches the tag grammar (ASCII word characters, `.` and `-`)."""
    return TAG_RE.fullmatch(tag) is not None


def is_upload_id(name: str) -> bool:
    """True for the UUID form the registry gives upload directories."""
    return UPLOAD_ID_RE.fullmatch(name) is not None
