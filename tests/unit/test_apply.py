"""The executor: changed/unchanged, triggered commands, dry runs, failures and resumption."""

from __future__ import annotations

import io

import pytest

from tasks.core.apply import Executor
from tasks.core.gates import CommandGate
from tasks.core.inventory import Host
from tasks.core.plan import HostPlan, RunCommand, TierPlan, WaitFor, WriteFile
from tasks.core.report import CHANGED, FAILED, NOT_RUN, UNCHANGED, WOULD_CHANGE, Report
from tests.unit.conftest import UseMachines
from tests.unit.fakes import FakeMachine

CONF = "/etc/app.conf"


def host(name: str) -> Host:
    return Host(name=name, address=f"10.9.0.{len(name)}")


def plan_for(*names: str, content: str = "a = 1\n") -> TierPlan:
    return TierPlan("demo", [HostPlan(host(name), [
        WriteFile(CONF, content),
        RunCommand("install app", "apt-get install app", unless="dpkg -s app"),
        RunCommand("restart app", "systemctl restart app", on_change=(CONF,)),
        WaitFor(CommandGate("app", command="app --ping", timeout=1)),
    ]) for name in names])


class Lab:
    """Fake machines by host name, wired into an executor."""

    def __init__(self, use_machines: UseMachines, **machines: FakeMachine) -> None:
        self.machines = machines
        use_machines(lambda h, timeouts=None: self.machines[h.name])

    def run(self, *tiers: TierPlan, dry: bool = False, show_diff: bool = False) -> Report:
        return Executor(Report(out=io.StringIO()), dry=dry, show_diff=show_diff).run(list(tiers))


def statuses(report: Report, name: str) -> list[tuple[str, str]]:
    return [(r.step, r.status) for r in report.results if r.host == name]


def not_installed(command: str) -> int:
    return 1 if command == "dpkg -s app" else 0


def test_first_apply_changes_and_second_changes_nothing(use_machines) -> None:
    machine = FakeMachine(host("a"), answers=not_installed)
    lab = Lab(use_machines, a=machine)
    first = lab.run(plan_for("a"))
    assert statuses(first, "a") == [(f"file {CONF}", CHANGED), ("install app", CHANGED),
                                    ("restart app", CHANGED), ("health app", UNCHANGED)]
    machine.answers = lambda command: 0  # now installed
    second = lab.run(plan_for("a"))
    assert second.count(CHANGED) == 0
    assert "systemctl restart app" not in machine.commands[len(machine.commands) // 2:]


def test_restart_runs_only_when_its_file_changed(use_machines) -> None:
    machine = FakeMachine(host("a"))
    lab = Lab(use_machines, a=machine)
    lab.run(plan_for("a"))
    machine.commands.clear()
    lab.run(plan_for("a", content="a = 2\n"))
    assert machine.commands.count("systemctl restart app") == 1
    machine.commands.clear()
    lab.run(plan_for("a", content="a = 2\n"))
    assert "systemctl restart app" not in machine.commands


def test_dry_run_touches_nothing_and_shows_a_diff(use_machines) -> None:
    machine = FakeMachine(host("a"), answers=not_installed)
    machine.files[CONF] = (b"a = 0\n", 0o644, "root", "root")
    lab = Lab(use_machines, a=machine)
    report = lab.run(plan_for("a"), dry=True)
    assert machine.files[CONF][0] == b"a = 0\n"
    assert not any(c.startswith(("apt-get", "systemctl")) for c in machine.commands)
    assert machine.markers == set()
    assert statuses(report, "a")[:3] == [(f"file {CONF}", WOULD_CHANGE),
                                         ("install app", WOULD_CHANGE),
                                         ("restart app", WOULD_CHANGE)]
    assert report.results[0].detail == "content differs: +1 -1 lines (--diff shows them)"
    diff = lab.run(plan_for("a"), dry=True, show_diff=True).results[0].detail
    assert "-a = 0" in diff and "+a = 1" in diff


def test_a_dry_run_lists_new_files_by_size_and_shows_them_with_diff(use_machines) -> None:
    lab = Lab(use_machines, a=FakeMachine(host("a"), answers=not_installed))
    tier = TierPlan("demo", [HostPlan(host("a"), [WriteFile("/etc/new.conf", "x = 1\ny = 2\n")])])
    assert lab.run(tier, dry=True).results[0].detail == "new file, 2 lines, 12 bytes"
    assert lab.run(tier, dry=True, show_diff=True).results[0].detail == \
        "new file\n      x = 1\n      y = 2"


def test_dry_run_hides_secret_content(use_machines) -> None:
    machine = FakeMachine(host("a"))
    machine.files["/s"] = (b"PASSWORD=old\n", 0o600, "root", "root")
    lab = Lab(use_machines, a=machine)
    tier = TierPlan("demo", [HostPlan(host("a"), [WriteFile("/s", "PASSWORD=new\n", mode=0o600,
                                                            secret=True)])])
    detail = lab.run(tier, dry=True).results[0].detail
    assert detail == "content differs (secret: not shown)"


def test_a_failing_host_stops_its_own_steps_only(use_machines) -> None:
    lab = Lab(use_machines, a=FakeMachine(host("a"), answers=not_installed),
              b=FakeMachine(host("b"), answers=lambda c: 1 if c.startswith(("dpkg", "apt"))
                            else 0))
    report = lab.run(plan_for("a", "b"))
    assert statuses(report, "a")[-1] == ("health app", UNCHANGED)
    b = statuses(report, "b")
    assert b[1] == ("install app", FAILED)
    assert [status for _, status in b[2:]] == [NOT_RUN, NOT_RUN]
    assert "stopped after install app failed" in report.results[-1].detail


def test_unreachable_host_fails_cleanly_and_others_finish(use_machines) -> None:
    lab = Lab(use_machines, a=FakeMachine(host("a")),
              b=FakeMachine(host("b"), unreachable=True))
    report = lab.run(plan_for("a", "b"))
    assert all(status != FAILED for _, status in statuses(report, "a"))
    failure = next(r for r in report.results if r.host == "b" and r.status == FAILED)
    assert "cannot connect to b (root@10.9.0.1:22)" in failure.detail


def test_dependent_tiers_do_not_run_after_a_failure(use_machines) -> None:
    lab = Lab(use_machines, a=FakeMachine(host("a"), unreachable=True), b=FakeMachine(host("b")))
    first = plan_for("a")
    second = TierPlan("after", plan_for("b").hosts, depends_on=("demo",))
    report = lab.run(first, second)
    after = [r for r in report.results if r.tier == "after"]
    assert {r.status for r in after} == {NOT_RUN}
    assert after[0].detail == "depends on demo, which failed"


def test_a_restart_owed_by_a_failed_run_runs_on_the_rerun(use_machines) -> None:
    machine = FakeMachine(host("a"), answers=lambda c: 1 if c == "systemctl restart app" else 0)
    lab = Lab(use_machines, a=machine)
    lab.run(plan_for("a"))  # file written, restart failed
    assert machine.markers
    machine.answers = lambda c: 0
    machine.commands.clear()
    report = lab.run(plan_for("a"))  # file unchanged now, but the restart is still owed
    assert ("restart app", CHANGED) in statuses(report, "a")
    assert machine.markers == set()


def test_summary_has_a_line_per_host(use_machines) -> None:
    lab = Lab(use_machines, a=FakeMachine(host("a")), bb=FakeMachine(host("bb"), unreachable=True))
    summary = lab.run(plan_for("a", "bb")).summary()
    lines = summary.splitlines()
    assert lines[0].split() == ["host", "changed", "unchanged", "failed", "not", "run"]
    assert lines[1].split()[:5] == ["a", "2", "2", "0", "0"]
    assert lines[2].split()[:5] == ["bb", "0", "0", "1", "3"]
    assert "cannot connect to bb" in lines[2]


def test_parallel_limits_how_many_hosts_of_a_tier_run_at_once(use_machines) -> None:
    import threading

    names = ("a", "b", "c")
    order: list[str] = []  # which host ran each command, in the order they ran
    lock = threading.Lock()
    everyone_at_once = threading.Barrier(len(names), timeout=5)

    def machine(name: str, barrier: threading.Barrier | None) -> FakeMachine:
        def answers(command: str) -> int:
            if barrier is not None and command == "app --ping":
                barrier.wait()  # fails (BrokenBarrierError) unless all hosts run together
            with lock:
                order.append(name)
            return 0
        return FakeMachine(host(name), answers=answers)

    lab = Lab(use_machines, **{n: machine(n, everyone_at_once) for n in names})
    report = Executor(Report(out=io.StringIO())).run([plan_for(*names)])
    assert report.failed == [] and set(order) == set(names)

    order.clear()
    lab.machines = {n: machine(n, None) for n in names}
    report = Executor(Report(out=io.StringIO()), parallel=1).run([plan_for(*names)])
    assert report.failed == []
    # One host after the other, in plan order: each host's commands are one contiguous run.
    assert [n for i, n in enumerate(order) if i == 0 or order[i - 1] != n] == list(names)
    with pytest.raises(ValueError, match="at least 1"):
        Executor(Report(out=io.StringIO()), parallel=0)


class SudoUser(FakeMachine):
    """A login that is not root: every command goes through `sudo -n`, which may be refused."""

    def __init__(self, name: str, sudo_works: bool) -> None:
        super().__init__(host(name), answers=self.answer)
        self.sudo_works = sudo_works

    @property
    def is_root(self) -> bool:
        return False

    def answer(self, command: str) -> int:
        if command.startswith("sudo -n"):
            return 0 if self.sudo_works else 1
        return 0

    def file_state(self, path: str):
        return None


def test_a_dry_run_where_sudo_is_refused_fails_instead_of_reporting_changes(use_machines) -> None:
    machine = SudoUser("a", sudo_works=False)
    report = Lab(use_machines, a=machine).run(
        TierPlan("demo", [HostPlan(host("a"), [
            RunCommand("install app", "apt-get install app", unless="dpkg -s app")])]),
        dry=True)
    [result] = report.results
    assert result.status == FAILED and "`sudo -n` is refused" in result.detail
    assert report.count(WOULD_CHANGE) == 0


@pytest.mark.parametrize("exited", [124, 126, 255])
def test_a_probe_that_cannot_run_is_an_error_not_a_missing_thing(use_machines, exited) -> None:
    machine = FakeMachine(host("a"), answers=lambda c: exited if c == "dpkg -s app" else 0)
    report = Lab(use_machines, a=machine).run(plan_for("a"), dry=True)
    failed = [r for r in report.results if r.status == FAILED]
    assert [r.step for r in failed] == ["install app"]
    assert f"the probe `dpkg -s app` could not run (exit {exited})" in failed[0].detail
    assert "apt-get install app" not in machine.commands


def test_a_dry_run_does_not_probe_with_a_file_it_would_install_first(use_machines) -> None:
    helper = "/usr/local/sbin/helper"
    machine = FakeMachine(host("a"), answers=lambda c: 126 if c.startswith(helper) else 0)
    plan = TierPlan("demo", [HostPlan(host("a"), [
        WriteFile(helper, "#!/bin/sh\n"),
        RunCommand("configure", f"{helper} apply", unless=f"{helper} is-configured")])])
    report = Lab(use_machines, a=machine).run(plan, dry=True)
    assert statuses(report, "a") == [(f"file {helper}", WOULD_CHANGE),
                                     ("configure", WOULD_CHANGE)]
    assert not any(c.startswith(helper) for c in machine.commands)
