"""deploy.doctor: find what is down, restart it once, report what still needs a person.

The checks are the deploy's own health gates (the WaitFor steps of every tier's plan, as
deploy.status probes them). A gate that carries a `restart` (a systemd unit or a compose service,
declared by its tier) may be restarted; gates without one (replication, quorum, a peer that is
reachable or not) are only reported. Tiers are handled in dependency order, the hosts of a tier
in parallel, so a database is back before the api that needs it is judged.

Never a loop: a component is restarted at most once per run, and at most `max_restarts` times
per host within `window` seconds across runs (RestartLog, a JSON file on the control machine).
Never a failover: a PostgreSQL standby or primary is only restarted, never promoted. Never
during a deploy: the caller holds (or checks) the inventory's deploy lock. An unreachable host
is reported, not acted on.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from tasks.core.errors import DifyopsError, GateTimeout
from tasks.core.fleet import Outcome, each_host
from tasks.core.gates import wait
from tasks.core.hosts import Machine
from tasks.core.inventory import Inventory
from tasks.core.lock import STATE_DIR, Locked, audit, deploy_lock, describe, held
from tasks.core.plan import Restart, TierPlan, WaitFor

HEALTHY = "healthy"
RESTARTED = "restarted"          # restarted by this run and healthy again
RECOVERED = "recovered"          # healthy again once other components were restarted
WOULD_RESTART = "would restart"  # --dry
NEEDS_PERSON = "needs a person"
HOST = "(host)"  # the component of a finding about the host itself (unreachable)
# Exit status when a deploy holds the lock: nothing was checked, try again later (EX_TEMPFAIL).
LOCKED_EXIT = 75

Say = Callable[[str, str], None]


@dataclass
class Finding:
    """One health gate on one host: what it answered, what doctor did, where it ended."""

    host: str
    tier: str
    component: str
    state: str
    answer: str = ""
    restart: str = ""            # the unit or compose service doctor restarted (or would)
    reason: str = ""             # why it needs a person

    @property
    def label(self) -> str:
        """'redis on :6379 on cache1', or 'cache1 unreachable'."""
        return f"{self.host} unreachable" if self.component == HOST else \
            f"{self.component} on {self.host}"

    @property
    def unhealthy(self) -> bool:
        """Whether it is still down at the end of the run (or would be restarted, --dry)."""
        return self.state in (NEEDS_PERSON, WOULD_RESTART)


class RestartLog:
    """Restarts per host and component within a sliding window, kept in a file between runs."""

    def __init__(self, path: Path, max_restarts: int, window: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.path, self.max_restarts, self.window, self.clock = path, max_restarts, window, clock
        self._lock = threading.Lock()
        try:
            self.entries: dict[str, list[float]] = json.loads(path.read_text())
        except FileNotFoundError:
            self.entries = {}
        except (OSError, ValueError) as exc:
            raise DifyopsError(f"cannot read doctor's restart history {path}: {exc}; fix: "
                               f"remove the file (the limits then start again)") from exc

    def recent(self, host: str, what: str) -> list[float]:
        """When this component was restarted on this host within the window."""
        since = self.clock() - self.window
        return [t for t in self.entries.get(f"{host}/{what}", []) if t > since]

    def allowed(self, host: str, what: str) -> bool:
        """Whether one more restart stays within the limit."""
        return len(self.recent(host, what)) < self.max_restarts

    def record(self, host: str, what: str) -> int:
        """Count a restart (saved at once: a run that dies later still counts it); return the
        number of restarts in the window, this one included."""
        with self._lock:
            times = [*self.recent(host, what), self.clock()]
            self.entries[f"{host}/{what}"] = times
            since = self.clock() - self.window
            self.entries = {key: kept for key, values in self.entries.items()
                            if (kept := [t for t in values if t > since])}
            self.path.parent.mkdir(parents=True, exist_ok=True)
            staged = self.path.with_suffix(".tmp")
            fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                json.dump(self.entries, handle, indent=1, sort_keys=True)
            os.replace(staged, self.path)
            return len(times)

    def describe(self) -> str:
        """'at most 3 restarts per component and host within 3600 s'."""
        return (f"at most {self.max_restarts} restart(s) per component and host within "
                f"{self.window:g} s")


def log_line(host: str, message: str) -> None:
    """One line per action, with the UTC time: readable in a cron log."""
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    print(f"{stamp} doctor {host}: {message}", flush=True)


@dataclass
class _HostRun:
    """One host's gates in one tier and what became of them."""

    findings: list[Finding] = field(default_factory=list)
    pending: list[tuple[Finding, WaitFor]] = field(default_factory=list)  # no restart of its own


def heal_host(machine: Machine, tier: str, waits: list[WaitFor], log: RestartLog, *,
              dry: bool, say: Say = log_line) -> _HostRun:
    """Probe the host's gates; restart each unhealthy component once (gates sharing a restart
    share it), then wait on its gates with their deadlines."""
    name = machine.host.name
    machine.check("exit 0", sudo=False)  # unreachable: HostError; sh and PowerShell alike
    run = _HostRun()
    groups: dict[str, tuple[Restart, list[tuple[Finding, WaitFor]]]] = {}
    for step in waits:
        try:
            healthy, answer = step.gate.probe(machine)
        except DifyopsError as exc:
            healthy, answer = False, str(exc)
        finding = Finding(name, tier, step.gate.name, HEALTHY if healthy else NEEDS_PERSON,
                          answer)
        run.findings.append(finding)
        if healthy:
            continue
        if step.restart is None:
            run.pending.append((finding, step))
        else:
            groups.setdefault(step.restart.what, (step.restart, []))[1].append((finding, step))
    for what, (restart, members) in groups.items():
        names = ", ".join(finding.component for finding, _ in members)
        first = members[0][0].answer[:160]
        for finding, _ in members:
            finding.restart = what
        if not log.allowed(name, what):
            reason = (f"not restarted: {what} was restarted {len(log.recent(name, what))} "
                      f"time(s) within {log.window:g} s ({log.describe()})")
            for finding, _ in members:
                finding.reason = reason
            say(name, f"{names} UNHEALTHY ({first}); {NEEDS_PERSON}: {reason}")
            continue
        if dry:
            for finding, _ in members:
                finding.state = WOULD_RESTART
            say(name, f"{names} UNHEALTHY ({first}); would restart {what}")
            continue
        count = log.record(name, what)
        say(name, f"{names} UNHEALTHY ({first}); restarting {what} "
                  f"(restart {count} of {log.max_restarts} within {log.window:g} s)")
        result = machine.run(restart.command)
        if not result.ok:
            for finding, _ in members:
                finding.reason = f"restarting {what} failed: {result.answer[:200]}"
            say(name, f"{NEEDS_PERSON}: restarting {what} failed: {result.answer[:200]}")
            continue
        for finding, step in members:
            try:
                finding.answer = wait(step.gate, machine)
                finding.state = RESTARTED
                say(name, f"{finding.component} healthy again after restarting {what}")
            except GateTimeout as exc:
                finding.reason = f"still unhealthy after restarting {what}: {exc}"
                say(name, f"{NEEDS_PERSON}: {finding.component} still unhealthy after "
                          f"restarting {what} (waited {step.gate.timeout:g} s)")
    return run


def settle(machine: Machine, pending: list[tuple[Finding, WaitFor]], *, restarted: bool,
           dry: bool, say: Say = log_line) -> None:
    """Gates doctor cannot restart: after restarts elsewhere, wait for them with their deadline
    (a standby streams again once its primary is back); otherwise report them."""
    for finding, step in pending:
        if restarted and not dry:
            try:
                finding.answer = wait(step.gate, machine)
                finding.state = RECOVERED
                say(finding.host, f"{finding.component} healthy again after the restarts")
                continue
            except GateTimeout as exc:
                finding.answer = str(exc)
        finding.reason = "doctor has no restart for it (it checks replication, a quorum or " \
                         "another host)"
        say(finding.host, f"{finding.component} UNHEALTHY ({finding.answer[:160]}); "
                          f"{NEEDS_PERSON}: {finding.reason}")


def run(plans: list[TierPlan], log: RestartLog, *, dry: bool = False,
        timeouts: Mapping[str, int] | None = None, say: Say = log_line) -> list[Finding]:
    """Every tier in order, its hosts in parallel: probe, restart once, wait, report."""
    findings: list[Finding] = []
    unreachable: set[str] = set()
    restarted = False
    for tier in plans:
        waits = {plan.host.name: [s for s in plan.steps if isinstance(s, WaitFor)]
                 for plan in tier.hosts}
        hosts = [plan.host for plan in tier.hosts
                 if waits[plan.host.name] and plan.host.name not in unreachable]
        outcomes: list[Outcome[_HostRun]] = each_host(
            hosts, lambda machine, tier=tier.tier, waits=waits: heal_host(
                machine, tier, waits[machine.host.name], log, dry=dry, say=say), timeouts)
        runs = {o.host.name: o.value for o in outcomes if o.ok and o.value is not None}
        for outcome in outcomes:
            if not outcome.ok:
                unreachable.add(outcome.host.name)
                say(outcome.host.name, f"{NEEDS_PERSON}: host unreachable, not acted on: "
                                       f"{outcome.error}")
                findings.append(Finding(outcome.host.name, tier.tier, HOST, NEEDS_PERSON,
                                        outcome.error, reason="host unreachable"))
        restarted = restarted or any(f.state == RESTARTED for r in runs.values()
                                     for f in r.findings)
        pending = {name: r.pending for name, r in runs.items() if r.pending}
        for outcome in each_host([o.host for o in outcomes if o.host.name in pending],
                                 lambda machine, pending=pending, restarted=restarted: settle(
                                     machine, pending[machine.host.name], restarted=restarted,
                                     dry=dry, say=say), timeouts):
            if not outcome.ok:
                for finding, _ in pending[outcome.host.name]:
                    finding.reason = f"host unreachable: {outcome.error}"
        for r in runs.values():
            findings.extend(r.findings)
    return findings


def summary_rows(findings: list[Finding]) -> list[tuple[str, int, int, int, str]]:
    """Per host: healthy, restarted (or would be), still down, and what needs a person."""
    rows = []
    for host in dict.fromkeys(f.host for f in findings):
        mine = [f for f in findings if f.host == host]
        fixed = [f for f in mine if f.state in (RESTARTED, RECOVERED, WOULD_RESTART)]
        down = [f for f in mine if f.state == NEEDS_PERSON]
        rows.append((host, sum(f.state == HEALTHY for f in mine), len(fixed), len(down),
                     "; ".join("unreachable" if f.component == HOST else f.component
                               for f in down)))
    return rows


def message(inventory: str, findings: list[Finding], *, fmt: str,
            now: datetime | None = None) -> dict:
    """The webhook's JSON: `text` for people (and Slack), the actions and what needs a person;
    with fmt alertmanager, also in the shape of Alertmanager's webhook (one alert per component:
    resolved when doctor brought it back, firing when it needs a person)."""
    now = now or datetime.now(UTC)
    acted = [f for f in findings if f.state in (RESTARTED, RECOVERED)]
    down = [f for f in findings if f.state == NEEDS_PERSON]
    lines = [f"difyops deploy.doctor, inventory {inventory}:"]
    lines += [f"- restarted {f.restart} on {f.host}: {f.component} healthy again" if
              f.state == RESTARTED else f"- {f.label} healthy again" for f in acted]
    lines += [f"- NEEDS A PERSON: {f.label}: {f.reason or f.answer}" for f in down]
    text = "\n".join(lines)
    if fmt == "slack":
        return {"text": text}
    stamp = now.isoformat(timespec="seconds").replace("+00:00", "Z")

    def alert(finding: Finding) -> dict:
        firing = finding.state == NEEDS_PERSON
        labels = {"alertname": "DifyopsDoctor", "inventory": inventory, "host": finding.host,
                  "tier": finding.tier, "component": finding.component,
                  "severity": "critical" if firing else "info"}
        return {"status": "firing" if firing else "resolved", "labels": labels,
                "annotations": {"summary": f"{finding.label}: "
                                           + (NEEDS_PERSON if firing else finding.state),
                                "description": finding.reason or finding.answer},
                "startsAt": stamp, "endsAt": "0001-01-01T00:00:00Z" if firing else stamp,
                "generatorURL": "",
                "fingerprint": hashlib.sha256(json.dumps(labels, sort_keys=True).encode())
                .hexdigest()[:16]}

    return {
        "version": "4", "groupKey": f"difyops-doctor/{inventory}", "truncatedAlerts": 0,
        "status": "firing" if down else "resolved", "receiver": "difyops-doctor",
        "groupLabels": {"alertname": "DifyopsDoctor"},
        "commonLabels": {"alertname": "DifyopsDoctor", "inventory": inventory},
        "commonAnnotations": {"summary": lines[0]}, "externalURL": "",
        "alerts": [alert(f) for f in [*acted, *down]],
        "text": text,
        "difyops": {"inventory": inventory, "at": stamp,
                    "did": [asdict(f) for f in acted], "needs_person": [asdict(f) for f in down]},
    }


def post(url: str, payload: dict, timeout: float = 20) -> str:
    """POST the message; '' when delivered, else why not (the URL is never shown)."""
    import requests  # imported here: most commands never post

    try:
        response = requests.post(url, json=payload, timeout=timeout)
    except requests.RequestException as exc:
        return f"{type(exc).__name__}"
    return "" if response.ok else f"HTTP {response.status_code}"


def restart_log(inventory: Inventory) -> RestartLog:
    """The inventory's restart history with its limits (doctor.max_restarts, doctor.window)."""
    settings = inventory.settings.doctor
    return RestartLog(STATE_DIR / "doctor" / f"{inventory.name}.json",
                      max(settings.max_restarts, 0), max(settings.window, 1))


def examine(inventory: Inventory, plans: list[TierPlan], *,
            dry: bool = False) -> tuple[list[Finding], str]:
    """deploy.doctor: under the deploy lock (only checked with --dry), heal, audit what was
    done and post it when anything was found. Returns the findings and '' or why the webhook
    could not be reached. Raises Locked, touching nothing, while a deploy holds the lock."""
    log, timeouts = restart_log(inventory), inventory.settings.timeouts
    if dry:
        holder = held(inventory.name, STATE_DIR)
        if holder:
            raise Locked(f"a deploy of inventory {inventory.name} holds the lock: "
                         f"{describe(holder)}")
        return run(plans, log, dry=True, timeouts=timeouts), ""
    with deploy_lock(inventory.name, STATE_DIR) as me:
        findings = run(plans, log, timeouts=timeouts)
        found = [f for f in findings if f.state != HEALTHY]
        if found:
            audit(inventory.name, {**me, "inventory": str(inventory.file), "doctor": [
                f"{f.host} {f.component}: {f.state}" + (f" ({f.restart})" if f.restart else "")
                for f in found]}, STATE_DIR)
    webhook = inventory.settings.monitor.alert_webhook
    if not (found and webhook):
        return findings, ""
    failed = post(webhook, message(inventory.name, findings,
                                   fmt=inventory.settings.monitor.webhook_format))
    if not failed:
        print("doctor: posted to monitor.alert_webhook", flush=True)
    return findings, failed and f"could not POST to monitor.alert_webhook ({failed})"
