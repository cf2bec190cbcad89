"""Rolling replacement: hosts one at a time, each taken out of the load balancer while it changes.

Each host gets the same plan a deploy would give it (files, commands, health gates). For every
host in order: a dry run first, and a host whose plan would change nothing is left alone (not
drained); otherwise drain it, apply its plan (the gates wait until it is healthy), undrain it.
The first failure stops the rollout: the hosts after it are not touched, so they keep serving
the release they run. The failed host stays out of the load balancer unless the caller can put
the release it ran back (`restore`) and that plan passes its gates; the outcome says which.
How a host leaves and re-enters the load balancer is injected (drain / undrain callables).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from tasks.core.apply import Executor
from tasks.core.errors import DifyopsError
from tasks.core.inventory import Host
from tasks.core.plan import HostPlan
from tasks.core.report import FAILED, WOULD_CHANGE, Report

HostAction = Callable[[str], None]


@dataclass
class Outcome:
    """Where a rollout got to."""

    replaced: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    failed: str = ""
    reason: str = ""
    untouched: list[str] = field(default_factory=list)
    drained: bool = False  # the failed host was taken out of the load balancer
    restored: bool = False
    restore_error: str = ""
    left_drained: bool = False

    @property
    def ok(self) -> bool:
        """Whether every host reached the target."""
        return not self.failed


def no_op(_: str) -> None:
    """Drain/undrain when there is no load balancer to tell."""


def roll(tier: str, plans: list[HostPlan], *, report: Report,
         timeouts: Mapping[str, int] | None = None, drain: HostAction = no_op,
         undrain: HostAction = no_op, behind_lb: Callable[[Host], bool] = lambda host: True,
         restore: Callable[[Host], HostPlan | None] | None = None) -> Outcome:
    """Replace the hosts of the plans one at a time (module doc); never raises for a host."""
    outcome = Outcome()
    checker = Executor(Report(out=io.StringIO()), dry=True, timeouts=timeouts)
    applier = Executor(report, timeouts=timeouts)
    try:
        for index, plan in enumerate(plans):
            name = plan.host.name
            report.expect(name)
            if not pending(checker, tier, plan):
                outcome.unchanged.append(name)
                report.note(f"[{tier}] {name}: already at the target release, left in service")
                continue
            lb = behind_lb(plan.host)
            try:
                if lb:
                    drain(name)
                    report.note(f"[{tier}] {name}: drained (out of the load balancer)")
            except DifyopsError as exc:
                stop(outcome, plans[index:], name, f"cannot drain {name}: {exc}")
                break
            if applier.run_host(tier, plan):
                outcome.replaced.append(name)
                if lb and not back_in(report, tier, name, undrain, outcome):
                    outcome.untouched = [p.host.name for p in plans[index + 1:]]
                    break
                continue
            stop(outcome, plans[index + 1:], name, last_failure(report, name))
            outcome.drained = outcome.left_drained = lb
            back = restore(plan.host) if restore else None
            if back is not None:
                report.note(f"[{tier}] {name}: putting back the release it ran")
                if applier.run_host(tier, back):
                    outcome.restored = True
                    outcome.left_drained = lb and not back_in(report, tier, name, undrain,
                                                              outcome)
                else:
                    outcome.restore_error = last_failure(report, name)
            break
    finally:
        checker.close()
        applier.close()
    return outcome


def pending(checker: Executor, tier: str, plan: HostPlan) -> bool:
    """Whether applying the plan would change anything (a dry run that fails counts as yes)."""
    checker.report.results.clear()
    checker.run_host(tier, plan)
    return any(r.status in (WOULD_CHANGE, FAILED) for r in checker.report.results)


def last_failure(report: Report, name: str) -> str:
    """The last step that failed on a host, with why."""
    failure = next((r for r in reversed(report.results)
                    if r.host == name and r.status == FAILED), None)
    return f"{failure.step}: {failure.detail}" if failure else "a step failed"


def stop(outcome: Outcome, rest: list[HostPlan], name: str, reason: str) -> None:
    """Record where the rollout stopped and which hosts it never reached."""
    outcome.failed, outcome.reason = name, reason
    outcome.untouched = [p.host.name for p in rest if p.host.name != name]


def back_in(report: Report, tier: str, name: str, undrain: HostAction, outcome: Outcome) -> bool:
    """Undrain a host; a failure stops the rollout (the host is healthy but out of service)."""
    try:
        undrain(name)
    except DifyopsError as exc:
        why = f"cannot put {name} back in the load balancer: {exc}"
        if outcome.failed:  # after putting its release back: keep why it failed first
            outcome.reason += f"; then {why}"
        else:
            outcome.failed, outcome.reason = name, why
        outcome.left_drained = True
        return False
    report.note(f"[{tier}] {name}: back in the load balancer")
    return True
