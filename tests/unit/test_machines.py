"""connect() is the one place machines come from: `using` stands another factory in for the real
one (for every module and thread) and puts the previous one back, and no module under tasks/
makes a machine around it (read with ast: no Machine class called, no private name of hosts.py
used)."""

from __future__ import annotations

import ast
import threading
from pathlib import Path

import pytest

from tasks.core import fleet, hosts
from tasks.core.hosts import LocalMachine, Machine, connect, using
from tasks.core.inventory import Host
from tests.unit.fakes import FakeMachine

TASKS = Path(__file__).resolve().parents[2] / "tasks"
HOSTS = TASKS / "core" / "hosts.py"
LOCAL = Host(name="here", address="127.0.0.1", connection="local")
# The module-level names hosts.py keeps to itself: the real factory and the installed one.
PRIVATE = frozenset(name for name in vars(hosts) if name.startswith("_")
                    and not name.startswith("__"))


def fakes(log: list[str], tag: str) -> hosts.Factory:
    """A factory handing out fake machines, logging `tag host` for each."""

    def make(host: Host, timeouts: dict[str, int] | None = None) -> Machine:
        log.append(f"{tag} {host.name}")
        return FakeMachine(host)

    return make


def test_using_stands_in_until_the_block_ends_then_the_previous_factory_is_back() -> None:
    log: list[str] = []
    with using(fakes(log, "outer")):
        with using(fakes(log, "inner")):
            assert isinstance(connect(LOCAL), FakeMachine)
        connect(LOCAL)
        with pytest.raises(RuntimeError), using(fakes(log, "failed")):
            raise RuntimeError("the block failed")
        connect(LOCAL)
    assert log == ["inner here", "outer here", "outer here"]
    assert type(connect(LOCAL)) is LocalMachine  # the real factory again


def test_the_installed_factory_reaches_the_fleets_threads() -> None:
    targets = [Host(name=name, address=f"10.0.0.{i}") for i, name in enumerate("abc", 1)]
    threads: set[int] = set()

    def make(host: Host, timeouts: dict[str, int] | None = None) -> Machine:
        threads.add(threading.get_ident())
        return FakeMachine(host)

    with using(make):
        outcomes = fleet.each_host(targets, lambda machine: type(machine).__name__)
    assert [o.value for o in outcomes] == ["FakeMachine"] * 3
    assert threads and threading.main_thread().ident not in threads


def machine_classes(sources: list[str]) -> set[str]:
    """Machine and the names of every class the sources derive from it, however indirectly."""
    found, classes = {"Machine"}, [node for source in sources
                                   for node in ast.walk(ast.parse(source))
                                   if isinstance(node, ast.ClassDef)]
    while more := {c.name for c in classes if c.name not in found and any(
            getattr(base, "id", getattr(base, "attr", None)) in found for base in c.bases)}:
        found |= more
    return found


def bypasses(source: str, makers: set[str]) -> list[str]:
    """`line: what` for every way the source gets a machine without connect(): a call of a
    Machine class, any use of a private name of hosts.py (its factories)."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            name = getattr(node.func, "id", getattr(node.func, "attr", None))
            if name in makers:
                found.append((node.lineno, f"calls {name}"))
        elif isinstance(node, ast.Name | ast.Attribute):
            name = node.id if isinstance(node, ast.Name) else node.attr
            if name in PRIVATE:
                found.append((node.lineno, f"uses {name}"))
        elif isinstance(node, ast.ImportFrom):
            found += [(node.lineno, f"imports {alias.name}") for alias in node.names
                      if alias.name in PRIVATE]
    return [f"{line}: {what}" for line, what in sorted(found)]


def test_no_module_makes_machines_around_connect() -> None:
    sources = {path: path.read_text() for path in sorted(TASKS.rglob("*.py"))}
    makers = machine_classes(list(sources.values()))
    assert {"LocalMachine", "SshMachine", "WindowsMachine"} <= makers
    bad = [f"{path.relative_to(TASKS.parent)}:{problem}" for path, source in sources.items()
           if path != HOSTS for problem in bypasses(source, makers)]
    assert not bad, "machines come from tasks.core.hosts.connect only:\n  " + "\n  ".join(bad)


def test_the_check_sees_every_way_around_connect() -> None:
    assert {"_factory", "_real_machine"} <= PRIVATE
    source = ("from tasks.core import hosts\n"
              "from tasks.core.hosts import _real_machine as connect\n"
              "from tasks.core.hosts import connect as open_host\n"
              "def make(host):\n    return LocalMachine(host)\n"
              "machine = hosts.SshMachine(host)\n"
              "hosts._factory = make\n"
              "windows = WindowsMachine(host)\n"
              "fine = open_host(host)\n")
    assert bypasses(source, {"Machine", "LocalMachine", "SshMachine", "WindowsMachine"}) == [
        "2: imports _real_machine", "5: calls LocalMachine", "6: calls SshMachine",
        "7: uses _factory", "8: calls WindowsMachine"]
    assert machine_classes(["class A(Machine): ...\nclass B(hosts.A): ...\nclass C: ..."]) == {
        "Machine", "A", "B"}
