"""Fixtures for the integration tests: a lab of container hosts reachable over SSH.

- ``lab`` (session): a :class:`tests.integration.lab.Lab`, closed at the end of the session
  (kept for debugging when ``DIFYOPS_KEEP_LAB=1``).
- ``ssh_hosts`` (session): three started hosts ``h1``, ``h2``, ``h3`` (a list, in that order).

Host keys are checked as on real servers: the lab records each host's keys as it starts it and
sets ``DIFY_KNOWN_HOSTS`` to that file for the session, so the engine in this process and every
``inv`` a module starts (they pass ``os.environ`` on) trust the lab's hosts and nothing else,
whatever name an inventory of a module has.

Every test that uses them is marked ``docker``. Without a Docker engine such tests are skipped
("no Docker engine: run scripts/setup"), except in CI (``CI=true``) where that is a failure.
So is a skipped test marked ``real_dify`` (no release source, no Python 3.12, an image that did
not build): CI passes only when the real Dify ran.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.integration.lab import Lab, LabHost

DOCKER_SKIP_REASON = "no Docker engine: run scripts/setup"
LAB_FIXTURES = frozenset({"lab", "ssh_hosts"})
_LAB_KEY = pytest.StashKey["Lab"]()
_KEPT_KEY = pytest.StashKey[str]()
_MODULE_KEY = pytest.StashKey[str]()  # the integration module running now
_DOCKER_STATE: dict[str, bool] = {}


def _truthy(name: str) -> bool:
    """True when environment variable ``name`` is set to 1/true/yes/on."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def docker_answers() -> bool:
    """True when ``docker info`` succeeds (checked once per session)."""
    if "ok" not in _DOCKER_STATE:
        docker = shutil.which("docker")
        ok = False
        if docker:
            try:
                ok = (
                    subprocess.run(
                        [docker, "info"], capture_output=True, timeout=30, check=False
                    ).returncode
                    == 0
                )
            except (OSError, subprocess.TimeoutExpired):
                ok = False
        _DOCKER_STATE["ok"] = ok
    return _DOCKER_STATE["ok"]


def require_docker() -> None:
    """Skip the current test without a Docker engine; in CI (CI=true) fail it instead."""
    if docker_answers():
        return
    if _truthy("CI"):
        pytest.fail(f"{DOCKER_SKIP_REASON} (CI=true: this is a failure, not a skip)", pytrace=False)
    pytest.skip(DOCKER_SKIP_REASON)


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``docker`` marker."""
    config.addinivalue_line(
        "markers", "docker: needs a Docker engine (the lab of container SSH hosts)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test that uses the lab fixtures with ``docker``."""
    for item in items:
        if LAB_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.docker)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start building the real Dify images the selected modules need, in the background
    (tests/integration/prebuild.py)."""
    if session.config.option.collectonly or not session.items or not docker_answers():
        return
    from tests.integration import prebuild

    modules = {module.__name__: module for module in
               (getattr(item, "module", None) for item in session.items) if module is not None}
    prebuild.start(list(modules.values()))


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Apply the Docker skip/fail rule to every test marked ``docker``."""
    if item.get_closest_marker("docker") is not None:
        require_docker()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """In CI (CI=true), a skipped ``real_dify`` test is reported as failed, with its reason."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and _truthy("CI") and item.get_closest_marker("real_dify") is not None:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = (f"{reason}\n(CI=true: a real_dify test that does not run is a "
                           "failure, not a skip)")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """Under -q the lab's tests are tens of minutes of dots: a line names each module as its
    first test starts (outside output capture), with the first sentence of its docstring."""
    module = item.nodeid.split("::")[0]
    if item.config.stash.get(_MODULE_KEY, "") == module:
        return
    first = _MODULE_KEY not in item.config.stash
    item.config.stash[_MODULE_KEY] = module
    reporter = item.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    if not first:
        reporter.write("\n")  # end the previous module's line of dots
    if first:
        reporter.write_line("integration tests: each module deploys to its own lab of container "
                            "hosts over SSH (about 50 minutes in all on two cores)")
    paragraph = " ".join((getattr(item.module, "__doc__", None) or "").split("\n\n")[0].split())
    summary = paragraph.split(". ")[0].rstrip(".")[:120]
    reporter.write_line(f"[lab] {module}" + (f": {summary}" if summary else ""))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print how long the lab took (images, host starts) and what DIFYOPS_KEEP_LAB kept."""
    lab = terminalreporter.config.stash.get(_LAB_KEY, None)
    if lab is None or not lab.timings:
        return
    terminalreporter.write_sep("-", "lab timings")
    for what, seconds in lab.timings.items():
        terminalreporter.write_line(f"{what}: {seconds:.1f} s")
    kept = terminalreporter.config.stash.get(_KEPT_KEY, None)
    if kept:
        terminalreporter.write_line(kept)


@pytest.fixture(scope="session")
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    """A lab for the whole session: removed at the end unless DIFYOPS_KEEP_LAB=1."""
    require_docker()
    from tests.integration.lab import Lab

    the_lab = Lab()
    request.config.stash[_LAB_KEY] = the_lab
    try:
        yield the_lab
    finally:
        if _truthy("DIFYOPS_KEEP_LAB"):
            names = ", ".join(f"{h.name}={h.address}" for h in the_lab.hosts.values())
            request.config.stash[_KEPT_KEY] = (
                f"DIFYOPS_KEEP_LAB=1: kept network {the_lab.network_name}, "
                f"hosts {names or '(none)'}, key {the_lab.key_file}"
            )
        else:
            the_lab.close()


@pytest.fixture(scope="session")
def ssh_hosts(lab: Lab) -> list[LabHost]:
    """Three started hosts, h1 h2 h3, shared by the whole session."""
    return lab.start(["h1", "h2", "h3"])
