"""Errors carry their exit code; the app has the one handler that turns them into output.

Every error an operator can meet is a `RegfsckError` whose `exit_code` is what the process
exits with; `cli.app.Command.invoke` prints it as one line on stderr (and the
`{"error", "exit_code"}` document under --json). The command modules do not catch and map.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import pkgutil
from pathlib import Path

import pytest

import regfsck
from regfsck.errors import ExitCode, Interrupted, RegfsckError, UsageError
from tests.support.cli import invoke

PACKAGE = Path(regfsck.__file__).resolve().parent


def _all_error_classes() -> dict[str, type[RegfsckError]]:
    found: dict[str, type[RegfsckError]] = {}
    for module in pkgutil.walk_packages([str(PACKAGE)], "regfsck."):
        if module.name.endswith("__main__"):
            continue
        loaded = importlib.import_module(module.name)
        for value in vars(loaded).values():
            if inspect.isclass(value) and issubclass(value, RegfsckError):
                found[f"{value.__module__}.{value.__qualname__}"] = value
    return found


# The exit code of each error when it reaches the operator (README: 2 usage, 3 cannot run,
# 1 damage, 130 interrupted). Errors whose code depends on their `reason` are checked below.
EXPECTED = {
    "regfsck.refs.RefError": ExitCode.USAGE,
    "regfsck.durations.DurationError": ExitCode.USAGE,
    "regfsck.digest.DigestArgumentError": ExitCode.USAGE,
    "regfsck.verify.UnknownRepositoryError": ExitCode.USAGE,
    "regfsck.root.RootError": ExitCode.CANNOT_RUN,
    "regfsck.storage.StorageError": ExitCode.CANNOT_RUN,
    "regfsck.storage.UnsafePathError": ExitCode.CANNOT_RUN,
    "regfsck.quarantine.QuarantineError": ExitCode.CANNOT_RUN,
    "regfsck.safety.SafetyError": ExitCode.CANNOT_RUN,
    "regfsck.safety.LockHeldError": ExitCode.CANNOT_RUN,
    "regfsck.objectstore.LockHeld": ExitCode.CANNOT_RUN,
    "regfsck.record.RecordError": ExitCode.CANNOT_RUN,
    "regfsck.repair.RepairError": ExitCode.CANNOT_RUN,
    "regfsck.inspect.ImageDamaged": ExitCode.FINDINGS,
    "regfsck.errors.Interrupted": ExitCode.INTERRUPTED,
}


def test_every_operator_error_is_a_regfsck_error_with_its_exit_code() -> None:
    found = _all_error_classes()
    for name, code in EXPECTED.items():
        assert name in found, f"{name} is not a RegfsckError"
        assert found[name].exit_code == code, name
    for cls in found.values():
        assert cls.exit_code in set(ExitCode)


@pytest.mark.parametrize(("module", "cls"), [
    ("regfsck.export", "ExportError"), ("regfsck.importer", "ImportFailed"),
    ("regfsck.sources", "SourceError")])
def test_reason_decides_the_exit_code(module: str, cls: str) -> None:
    error = getattr(importlib.import_module(module), cls)
    assert error("x", "usage").exit_code == ExitCode.USAGE
    assert error("x", "damage").exit_code == ExitCode.FINDINGS
    assert error("x", "io").exit_code == ExitCode.CANNOT_RUN


def test_one_cancellation_exception() -> None:
    """Readers, hashers, the deep pass, export, import and repair stop with one class."""
    names = {name for name, cls in _all_error_classes().items() if issubclass(cls, Interrupted)}
    assert names == {"regfsck.errors.Interrupted"}
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                assert not node.name.endswith(("Interrupted", "Stopped")) or (
                    path.name == "errors.py"), f"{path.name}: {node.name}"


def test_command_modules_do_not_catch_and_map() -> None:
    """No `except` in a command module ends in `fail(...)`: the app's handler renders."""
    offenders = []
    for path in sorted((PACKAGE / "cli").glob("cmd_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ExceptHandler):
                calls = [n for n in ast.walk(node) if isinstance(n, ast.Call)
                         and isinstance(n.func, ast.Name) and n.func.id == "fail"]
                if calls:
                    offenders.append(f"{path.name}:{node.lineno}")
    assert not offenders, offenders


def test_the_app_renders_an_error_as_one_line_with_its_exit_code(tmp_path: Path) -> None:
    missing = tmp_path / "nothing-here"
    result = invoke("runs", str(missing))
    assert result.returncode == ExitCode.CANNOT_RUN
    assert result.stdout == ""
    assert result.stderr.startswith("regfsck: ") and result.stderr.count("\n") == 1


def test_the_app_renders_an_error_as_json_under_json(tmp_path: Path) -> None:
    (tmp_path / "docker" / "registry" / "v2").mkdir(parents=True)
    result = invoke("purge", str(tmp_path), "../etc", "--json")
    assert result.returncode == ExitCode.USAGE
    document = json.loads(result.stdout)
    assert set(document) == {"error", "exit_code"}
    assert document["exit_code"] == ExitCode.USAGE and "not a run id" in document["error"]
    result = invoke("gc", str(tmp_path), "--grace", "soon", "--json")
    assert result.returncode == ExitCode.USAGE
    assert json.loads(result.stdout)["error"].startswith("--grace: not a duration")


def test_usage_errors_are_usage_errors() -> None:
    from regfsck.durations import parse_duration

    with pytest.raises(UsageError, match=r"^--grace: not a duration"):
        parse_duration("soon", "--grace")


def test_an_error_that_ends_a_change_says_what_is_kept_and_how_to_free_room(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The mutation session marks the errors that end it; the app's one handler words them:
    an I/O error midway keeps what was changed so far, and a full disk names the run to
    purge (the newest hint of `cli/sweeping.refusals`, which caught and re-worded them)."""
    import errno

    from regfsck import quarantine
    from regfsck.root import locate
    from regfsck.session import mutation_session
    from regfsck.storage import StorageError
    from tests.support.tree import build

    build(tmp_path, {"blobs/sha256/aa/aaaa/data": b"orphan", "repositories/r/_layers": None})
    root = locate(tmp_path)
    with mutation_session(root, command="test") as session, quarantine.Run.begin(session, {}) as run:
        run.quarantine("blobs/sha256/aa/aaaa")
        run.finish()

    def full(*args: object, **kwargs: object) -> None:
        raise StorageError(errno.ENOSPC, "No space left on device", "meta.json")

    monkeypatch.setattr(quarantine, "_write_meta", full)
    result = invoke("undo", str(tmp_path), run.run_id)
    assert result.returncode == ExitCode.CANNOT_RUN, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("regfsck: stopped: ")
    assert "No space left on device (changes made so far are kept and undoable" in result.stderr
    assert f"free the oldest for good with `regfsck purge {tmp_path} {run.run_id} --apply`" \
        in result.stderr
    error = StorageError(errno.EIO, "I/O error", "x")
    with pytest.raises(StorageError) as raised, mutation_session(root, command="test"):
        raise error
    assert raised.value.changing == root and raised.value.midway
    with pytest.raises(StorageError) as raised, \
            mutation_session(root, command="purge", tree=False):
        raise StorageError(errno.EIO, "I/O error", "x")
    assert raised.value.changing is None and not raised.value.midway  # purge: as it is
