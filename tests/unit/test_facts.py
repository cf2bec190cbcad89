"""Facts: the parsers on answers captured from a real lab host (Debian 12, systemd), and the
executor deciding in Python from them (tasks/core/facts.py, tasks/core/apply.py)."""

from __future__ import annotations

import io
import subprocess

import pytest

from tasks.core import facts
from tasks.core.apply import Executor
from tasks.core.inventory import Host
from tasks.core.plan import HostPlan, RunCommand, TierPlan
from tasks.core.report import CHANGED, FAILED, UNCHANGED, WOULD_CHANGE, Report
from tests.unit.fakes import FakeMachine

# Answers of the facts' commands on a lab host, as captured.
SSH_UNIT = "ActiveState=active\nUnitFileState=enabled\n"
NO_UNIT = "ActiveState=inactive\nUnitFileState=\n"
JOURNALD = "ActiveState=active\nUnitFileState=static\n"
PACKAGES = "bash\tinstalled\nopenssh-server\tinstalled\n"  # asked: openssh-server nosuch-pkg bash


def test_units_read_as_systemctl_answers_them() -> None:
    assert facts.unit_state(SSH_UNIT) == facts.UnitState("active", "enabled")
    ssh, missing, static = (facts.unit_state(t) for t in (SSH_UNIT, NO_UNIT, JOURNALD))
    assert (ssh.running, ssh.enabled) == (True, True)
    assert (missing.running, missing.enabled) == (False, False)
    assert static.enabled  # `systemctl is-enabled` answers 0 for static units
    assert str(missing) == "inactive, no unit file"
    with pytest.raises(ValueError):
        facts.unit_state("Failed to connect to bus: Host is down\n")
    with pytest.raises(ValueError):
        facts.installed_packages("dpkg-query: error\n")
    no_systemd = facts.unit_state("no systemd\n")
    assert (no_systemd.running, no_systemd.enabled) == (False, False)


def test_packages_read_installed_names_only() -> None:
    assert facts.installed_packages(PACKAGES) == {"bash", "openssh-server"}
    assert facts.installed_packages("nginx\tconfig-files\nredis\tinstalled\n") == {"redis"}
    holds = facts.all_installed("openssh-server", "nosuch-pkg")
    assert not holds.test(facts.installed_packages(PACKAGES))
    assert facts.all_installed("bash").test(facts.installed_packages(PACKAGES))


def test_paths_read_kind_and_owner() -> None:
    assert facts.path_state("directory|0\n") == facts.PathState("directory", 0)
    assert facts.path_state("missing\n") is None
    assert facts.path_state("symbolic link|0\n").kind == "symbolic link"  # dangling, too
    storage = facts.is_directory("/srv/dify/storage", uid=1001)
    assert storage.test(facts.path_state("directory|1001"))
    assert not storage.test(facts.path_state("directory|0"))
    assert not storage.test(facts.path_state("regular file|1001"))
    assert not storage.test(None)


def test_commands_are_found_only_as_executable_files(tmp_path) -> None:
    """The fact's own command run by the real sh: a name in PATH, an absolute path that is not
    executable, a missing name and one with a space (one word, not two)."""
    plain = tmp_path / "not executable"
    plain.write_text("")
    fact = facts.commands("sh", str(plain), "no-such-command-here", "sh -x")
    answer = subprocess.run(["sh", "-c", fact.command], capture_output=True, text=True,
                            check=True).stdout
    found = fact.parse(answer)
    assert found.keys() == {"sh", str(plain), "no-such-command-here", "sh -x"}
    assert found["sh"].endswith("/sh")
    assert found[str(plain)] == found["no-such-command-here"] == found["sh -x"] == ""
    assert facts.all_found("sh").test(found)
    assert not facts.all_found("sh", "no-such-command-here").test(found)
    with pytest.raises(ValueError):
        facts.found_commands("sh /usr/bin/sh\n")


def test_fact_commands_only_read_and_quote_their_values() -> None:
    assert facts.path("/srv/my dir").command == (
        "if [ -e '/srv/my dir' ]; then stat -L -c '%F|%u' '/srv/my dir'; elif [ -L '/srv/my dir' "
        "]; then stat -c '%F|%u' '/srv/my dir'; else echo missing; fi")
    assert facts.packages("nginx", "redis-server").command == (
        "dpkg-query -W -f='${Package}\\t${db:Status-Status}\\n' nginx redis-server 2>/dev/null; "
        "[ $? -le 1 ]")


class UnitHost(FakeMachine):
    """A host whose unit `nginx` is as `state` says; `enable` starts it."""

    def __init__(self, state: str, exit_code: int = 0) -> None:
        super().__init__(Host(name="h1", address="10.0.0.1"), answers=self.answer)
        self.state, self.exit_code = state, exit_code

    def answer(self, command: str) -> int:
        if command.startswith("systemctl enable"):
            self.state = SSH_UNIT
        return self.exit_code if "systemctl show" in command else 0

    def output(self, command: str) -> str:
        return self.state if "systemctl show" in command else ""


def apply(machine: FakeMachine, dry: bool = False) -> Report:
    step = RunCommand("enable and start nginx", "systemctl enable --now nginx",
                      unless=facts.running_and_enabled("nginx"))
    executor = Executor(Report(out=io.StringIO()), dry=dry)
    executor.machines[machine.host.name] = machine
    return executor.run([TierPlan("lb", [HostPlan(machine.host, [step])])])


def test_the_executor_decides_from_the_fact_and_says_what_it_found() -> None:
    machine = UnitHost(NO_UNIT)
    dry = apply(machine, dry=True).results[0]
    assert (dry.status, dry.detail) == (WOULD_CHANGE, "would run (unit nginx: inactive, no unit "
                                                      "file)")
    assert "systemctl enable --now nginx" not in machine.commands
    assert apply(machine).results[0].status == CHANGED
    again = apply(machine).results[0]
    assert (again.status, again.detail) == (UNCHANGED, "already in place")


def test_a_fact_that_cannot_run_is_an_error_never_needed() -> None:
    result = apply(UnitHost(NO_UNIT, exit_code=1), dry=True).results[0]
    assert result.status == FAILED
    assert result.detail.startswith("h1 (root@10.0.0.1:22): cannot read unit nginx: ")


def test_an_answer_the_fact_cannot_parse_is_an_error_never_needed() -> None:
    result = apply(UnitHost("Failed to connect to bus\n"), dry=True).results[0]
    assert result.status == FAILED
    assert "cannot read unit nginx: unexpected answer 'Failed to connect to bus'" in result.detail


def test_a_refused_sudo_is_said_before_any_fact_is_read() -> None:
    class NoSudo(UnitHost):
        is_root = False  # type: ignore[assignment]

        def answer(self, command: str) -> int:
            return 1 if command == "sudo -n true" else super().answer(command)

    machine = NoSudo(SSH_UNIT)
    result = apply(machine, dry=True).results[0]
    assert result.status == FAILED and "`sudo -n` is refused" in result.detail
    assert not any("systemctl show" in command for command in machine.commands)
