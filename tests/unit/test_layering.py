"""Dependencies point downward only, read from the source with ast (nothing imported).

tasks/core, the engine, imports nothing else of tasks/: no tier, no backup module, no task module.
tasks/tiers may use the engine and the backups; tasks/backups only the engine. No package below
the task modules (tasks/<namespace>.py, `inv <namespace>.*`) imports one of them, nor the `inv`
entry (tasks/__init__.py).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TASKS = Path(__file__).resolve().parents[2] / "tasks"

# package under tasks/ -> the packages under tasks/ its modules may import
ALLOWED = {
    "core": ("core",),
    "tiers": ("core", "tiers", "backups"),
    "backups": ("core", "backups"),
}


def imports(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, dotted name) of every import in a module's source, function-level ones included;
    relative imports resolved against the module, and `from M import a` read as M.a (a may be a
    module)."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            origin = ".".join([*base, *([node.module] if node.module else [])])
            found += [(node.lineno, f"{origin}.{alias.name}") for alias in node.names]
    return sorted(found)


def violations(source: str, module: str, allowed: tuple[str, ...],
               is_package: bool = False) -> list[str]:
    """`module:line imports name` for every import of tasks/ outside the allowed packages."""
    bad = []
    for line, name in imports(source, module, is_package):
        parts = name.split(".")
        if parts[0] == "tasks" and (len(parts) < 2 or parts[1] not in allowed):
            bad.append(f"{module}:{line} imports {name}")
    return bad


def modules(package: str) -> list[tuple[str, Path]]:
    """(dotted name, file) of every module of a package under tasks/."""
    found = []
    for path in sorted((TASKS / package).rglob("*.py")):
        parts = path.relative_to(TASKS.parent).with_suffix("").parts
        found.append((".".join(parts[:-1] if parts[-1] == "__init__" else parts), path))
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_packages_import_only_what_lies_below_them(package: str) -> None:
    found = modules(package)
    assert found, f"no module under tasks/{package}"
    bad = [problem for name, path in found
           for problem in violations(path.read_text(), name, ALLOWED[package],
                                     path.name == "__init__.py")]
    assert not bad, (f"tasks/{package} may import only tasks."
                     f"{{{', '.join(ALLOWED[package])}}}:\n  " + "\n  ".join(bad))


def test_the_check_sees_every_kind_of_import() -> None:
    source = ("import tasks\nfrom tasks import app\nfrom tasks.tiers import lb\n"
              "from tasks.core.plan import Step\nfrom . import fleet\nfrom .. import deploy\n"
              "from ..backups.engine import backup_now\n"
              "def later():\n    import tasks.backups.engine\n")
    assert violations(source, "tasks.core.example", ("core",)) == [
        "tasks.core.example:1 imports tasks",
        "tasks.core.example:2 imports tasks.app",
        "tasks.core.example:3 imports tasks.tiers.lb",
        "tasks.core.example:6 imports tasks.deploy",
        "tasks.core.example:7 imports tasks.backups.engine.backup_now",
        "tasks.core.example:9 imports tasks.backups.engine",
    ]
    assert violations("from . import placement\n", "tasks.core", ("core",), is_package=True) == []


def test_only_the_command_builder_quotes_for_the_shell() -> None:
    """Every value reaches a shell through tasks/core/shell.py (command, words, quote): no other
    module imports shlex or pipes."""
    bad = [f"{name}:{line} imports {imported}"
           for package in ("", *ALLOWED) for name, path in (
               modules(package) if package else
               [(f"tasks.{p.stem}", p) for p in sorted(TASKS.glob("*.py"))])
           if name != "tasks.core.shell"
           for line, imported in imports(path.read_text(), name, path.name == "__init__.py")
           if imported.split(".")[0] in ("shlex", "pipes")]
    assert not bad, "quote through tasks.core.shell instead:\n  " + "\n  ".join(bad)
