"""The executor: dry-run or apply a list of tier plans, hosts of a tier in parallel.

Dry run only reads (file contents for diffs, `unless` probes); apply installs files, runs the
commands that are needed and waits on health gates. A failure on a host stops that host's
remaining steps and every tier that depends on its tier; other hosts and tiers go on, and the
report says exactly where each host stopped. A rerun resumes: files already right are left,
commands whose trigger files changed in a failed run still run (a marker on the host says so).
"""

from __future__ import annotations

import difflib
import hashlib
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor

from tasks.core import shell
from tasks.core.errors import DifyopsError
from tasks.core.facts import Holds
from tasks.core.gates import wait
from tasks.core.hosts import Machine, connect
from tasks.core.inventory import Host
from tasks.core.plan import HostPlan, RunCommand, Step, TierPlan, WaitFor, WriteFile
from tasks.core.report import (
    CHANGED,
    FAILED,
    NOT_RUN,
    UNCHANGED,
    WOULD_CHANGE,
    Report,
    StepResult,
)

MARKER_DIR = "/var/lib/difyops/pending"
MAX_PARALLEL = 16


class Executor:
    """Runs plans against hosts, reusing one connection per host for the whole run."""

    def __init__(self, report: Report, *, dry: bool = False, show_diff: bool = False,
                 timeouts: Mapping[str, int] | None = None, parallel: int = MAX_PARALLEL) -> None:
        if parallel < 1:
            raise ValueError(f"parallel must be at least 1, not {parallel}")
        self.report = report
        self.dry = dry
        self.show_diff = show_diff  # a dry run prints whole new files and diffs, not their sizes
        self.timeouts = timeouts
        self.parallel = parallel  # hosts of one tier at a time (1: one host after the other)
        self.machines: dict[str, Machine] = {}

    def machine(self, host: Host) -> Machine:
        """The connection to a host, opened once."""
        if host.name not in self.machines:
            self.machines[host.name] = connect(host, self.timeouts)
        return self.machines[host.name]

    def close(self) -> None:
        """Close every connection opened."""
        for machine in self.machines.values():
            machine.close()

    def run(self, tiers: Iterable[TierPlan]) -> Report:
        """Apply (or dry-run) the tiers in order; return the report."""
        tiers = list(tiers)
        for tier in tiers:
            for plan in tier.hosts:
                self.report.expect(plan.host.name)
        failed_tiers: set[str] = set()
        for tier in tiers:
            blocked = [name for name in tier.depends_on if name in failed_tiers]
            if blocked:
                self.skip_tier(tier, f"depends on {', '.join(blocked)}, which failed")
                failed_tiers.add(tier.tier)
                continue
            if not self.run_tier(tier):
                failed_tiers.add(tier.tier)
        return self.report

    def run_tier(self, tier: TierPlan) -> bool:
        """Every host of the tier; True when none failed."""
        workers = 1 if tier.serial else min(self.parallel, max(len(tier.hosts), 1))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            outcomes = list(pool.map(lambda plan: self.run_host(tier.tier, plan), tier.hosts))
        return all(outcomes)

    def skip_tier(self, tier: TierPlan, reason: str) -> None:
        """Report every step of a tier that cannot run."""
        for plan in tier.hosts:
            for step in plan.steps:
                self.report.add(StepResult(tier.tier, plan.host.name, step.label, NOT_RUN, reason))

    def run_host(self, tier: str, plan: HostPlan) -> bool:
        """The host's steps in order; stop at the first failure and report the rest as not run."""
        changed_files: set[str] = set()
        for index, step in enumerate(plan.steps):
            try:
                machine = self.machine(plan.host)
                status, detail = self.do_step(machine, plan, step, changed_files)
            except DifyopsError as exc:
                self.report.add(StepResult(tier, plan.host.name, step.label, FAILED, str(exc)))
                for rest in plan.steps[index + 1:]:
                    self.report.add(StepResult(tier, plan.host.name, rest.label, NOT_RUN,
                                               f"stopped after {step.label} failed"))
                return False
            self.report.add(StepResult(tier, plan.host.name, step.label, status, detail))
        return True

    def do_step(self, machine: Machine, plan: HostPlan, step: Step,
                changed_files: set[str]) -> tuple[str, str]:
        """One step: (status, detail)."""
        if isinstance(step, WriteFile):
            return self.write_file(machine, plan, step, changed_files)
        if isinstance(step, RunCommand):
            return self.run_command(machine, step, changed_files)
        if isinstance(step, WaitFor):
            if self.dry:
                return UNCHANGED, f"would wait up to {step.gate.timeout:g} s"
            return UNCHANGED, wait(step.gate, machine)
        raise TypeError(f"unknown step {step!r}")

    def write_file(self, machine: Machine, plan: HostPlan, step: WriteFile,
                   changed_files: set[str]) -> tuple[str, str]:
        content = step.content.encode()
        if self.dry:
            detail = self.diff(machine, step, content)
            if detail is None:
                return UNCHANGED, ""
            changed_files.add(step.path)
            return WOULD_CHANGE, detail
        changed = machine.install_file(step.path, content, mode=step.mode, owner=step.owner,
                                       group=step.group)
        if not changed:
            return UNCHANGED, ""
        changed_files.add(step.path)
        for command in plan.steps:
            if isinstance(command, RunCommand) and step.path in command.on_change:
                machine.check(f"mkdir -p {MARKER_DIR} && touch {marker(command)}")
        return CHANGED, ""

    def run_command(self, machine: Machine, step: RunCommand,
                    changed_files: set[str]) -> tuple[str, str]:
        if step.on_change:
            triggered = bool(changed_files.intersection(step.on_change)) or machine.probe(
                f"test -e {marker(step)}")
            if not triggered:
                return UNCHANGED, "no trigger file changed"
        if self.dry and step.probe and any(path in step.probe for path in changed_files):
            # The probe runs a file this plan installs first: nothing on the host can answer it.
            return (WOULD_CHANGE, "would run (its check needs a file this plan installs)") \
                if step.changes else (UNCHANGED, "would check")
        found = ""
        if isinstance(step.unless, Holds):
            done, found = step.unless.check(machine)
        else:
            done = bool(step.unless) and machine.probe(step.unless)
        if done:
            self.clear_marker(machine, step)
            return UNCHANGED, "already in place"
        if self.dry:
            why = f" ({found})" if found else ""
            return (WOULD_CHANGE, f"would run{why}") if step.changes else (UNCHANGED,
                                                                           "would check")
        result = machine.run(step.command)
        if not result.ok:
            raise DifyopsError(f"`{step.name}` failed on {machine.host.target}: {result.answer}")
        self.clear_marker(machine, step)
        return (CHANGED, "") if step.changes else (UNCHANGED, "passed")

    def clear_marker(self, machine: Machine, step: RunCommand) -> None:
        """Forget that a triggered command is owed (after it ran or proved unnecessary)."""
        if step.on_change and not self.dry:
            machine.run(f"rm -f {marker(step)}")

    def diff(self, machine: Machine, step: WriteFile, content: bytes) -> str | None:
        """What applying the file would change (None: nothing): its size, or with show_diff the
        whole new file or the unified diff; secret contents stay hidden."""
        state = machine.file_state(step.path)
        if state is None:
            if step.secret:
                return "new file"
            if not self.show_diff:
                return f"new file, {len(step.content.splitlines())} lines, {len(content)} bytes"
            return "new file\n" + indent(step.content)
        notes = []
        if (state.mode, state.owner, state.group) != (step.mode, step.owner, step.group):
            notes.append(f"mode/owner {state.mode:04o} {state.owner}:{state.group} -> "
                         f"{step.mode:04o} {step.owner}:{step.group}")
        if state.sha256 != hashlib.sha256(content).hexdigest():
            if step.secret:
                notes.append("content differs (secret: not shown)")
            else:
                current = (machine.read_file(step.path) or b"").decode(errors="replace")
                lines = list(difflib.unified_diff(current.splitlines(),
                                                  step.content.splitlines(),
                                                  f"{machine.host.name}:{step.path}", "planned",
                                                  lineterm=""))
                if self.show_diff:
                    notes.append("\n" + indent("\n".join(lines)))
                else:
                    added = sum(1 for line in lines[2:] if line.startswith("+"))
                    removed = sum(1 for line in lines[2:] if line.startswith("-"))
                    notes.append(f"content differs: +{added} -{removed} lines (--diff shows them)")
        return " ".join(notes) if notes else None


def marker(step: RunCommand) -> str:
    """The host-side file that says a triggered command is still owed."""
    digest = hashlib.sha256(f"{step.name}\0{step.command}".encode()).hexdigest()[:16]
    return shell.quote(f"{MARKER_DIR}/{digest}")


def indent(text: str) -> str:
    """Indent a block under its progress line."""
    return "\n".join(f"      {line}" for line in text.splitlines())


def execute(tiers: list[TierPlan], *, dry: bool = False, show_diff: bool = False,
            report: Report | None = None, timeouts: Mapping[str, int] | None = None,
            parallel: int = MAX_PARALLEL) -> Report:
    """Run the tiers and close every connection; the report holds the outcome."""
    executor = Executor(report or Report(), dry=dry, show_diff=show_diff, timeouts=timeouts,
                        parallel=parallel)
    try:
        executor.run(tiers)
    finally:
        executor.close()
    executor.report.note(("\nplan (dry run, nothing changed):\n" if dry else "\nsummary:\n")
                         + executor.report.summary())
    return executor.report
