"""net: the host firewall (nftables) and SSH hardening, planned from the inventory's roles."""

from __future__ import annotations

from contextlib import nullcontext

from invoke import Context, task
from invoke.exceptions import Exit

from tasks.core.apply import execute
from tasks.core.cli import load, reported
from tasks.core.errors import DifyopsError
from tasks.core.fleet import each_host, table
from tasks.core.gates import poll
from tasks.core.hosts import connect
from tasks.core.inventory import Host, Inventory
from tasks.core.lock import deploy_lock
from tasks.core.tiers import build
from tasks.tiers import firewall


# A dry run shows the rules in full: what a firewall would let through is the point of it.
@task(help={"dry": "print the plan with a diff of every file (the rules too); change nothing"})
@reported
def apply(ctx: Context, dry: bool = False) -> None:
    """Apply the host firewall (and SSH hardening when set); rolled back unless confirmed."""
    inventory = load(ctx)
    with nullcontext() if dry else deploy_lock(inventory.name):
        apply_firewall(inventory, dry=dry, show_diff=True)


def apply_firewall(inventory: Inventory, *, dry: bool, show_diff: bool) -> None:
    """net.apply's work, also deploy.all's first tier: the rules planned with each host's view
    of this machine, applied (or dry-run); after a failed confirmation, wait for the hosts'
    rollback timers and say what happened."""
    timeouts = inventory.settings.timeouts
    hosts = inventory.with_role(*firewall.FIREWALLED_ROLES)
    # Each host's view of this machine's address: SSH from it stays allowed.
    seen = each_host(hosts, firewall.control_address, timeouts)
    control = {outcome.host.name: outcome.value for outcome in seen if outcome.ok}
    action = "dry run of" if dry else "applying"
    print(f"{action} the host firewall on inventory {inventory.name} ({len(hosts)} host(s); "
          f"rollback after {inventory.settings.net.rollback_seconds} s unless confirmed)",
          flush=True)
    report = execute(build([firewall.tier(control)], inventory), dry=dry, show_diff=show_diff,
                     timeouts=timeouts)
    if not report.failed:
        return
    confirms = {f"health {firewall.CONFIRM_FIREWALL}", f"health {firewall.CONFIRM_SSHD}"}
    failed = {r.host for r in report.failed
              if r.step in confirms and firewall.REFUSED not in r.detail}
    cut = [host.name for host in hosts if host.name in failed]
    notes = [f"error: {len(report.failed)} step(s) failed; see the summary above."]
    for name in cut:
        notes.append(wait_for_rollback(inventory, inventory.host(name)))
    notes.append("Fix the cause and run the same command again: it resumes.")
    raise Exit("\n".join(notes), code=1)


def wait_for_rollback(inventory: Inventory, host: Host) -> str:
    """After a change cut new SSH connections: wait for the host's timer to restore access."""
    net, timeouts = inventory.settings.net, inventory.settings.timeouts
    waited = net.rollback_seconds + 2 * timeouts.connect + 10

    def answers() -> tuple[bool, str]:
        machine = connect(host, {"connect": min(timeouts.connect, 5), "command": 60})
        try:
            restored = machine.run(f"{firewall.SCRIPT} firewall-as-confirmed", timeout=30).ok
        except DifyopsError as exc:
            return False, str(exc)
        finally:
            machine.close()
        state = ("the rules confirmed earlier are back" if restored else
                 "but the rules in force are not the ones confirmed earlier: see inv "
                 "net.status")
        return True, (f"{host.name}: the change cut new SSH connections from this machine and "
                      f"was rolled back by the host's timer; it answers again, {state}. Check "
                      f"net.management and net.allow_control.")

    back, answer = poll(answers, waited, 1)
    if back:
        return answer
    return (f"{host.name}: still unreachable over SSH {net.rollback_seconds} s after the "
            f"change ({answer}); its rollback timer should have restored the previous rules: "
            f"check the host's console")


@task
@reported
def status(ctx: Context) -> None:
    """Show the firewall rules in force per host and how they differ from the plan."""
    inventory = load(ctx)
    hosts = inventory.with_role(*firewall.FIREWALLED_ROLES)
    outcomes = each_host(hosts, lambda machine: firewall.read_state(inventory, machine),
                         inventory.settings.timeouts)
    rows = []
    for outcome in outcomes:
        if outcome.ok:
            rows.append((outcome.host.name, outcome.value.firewall, outcome.value.ssh))
        else:
            rows.append((outcome.host.name, f"unreachable: {outcome.error}", "-"))
    print(table(["host", "firewall", "ssh"], rows))
    for outcome in outcomes:
        if not outcome.ok:
            continue
        state = outcome.value
        print(f"\n{outcome.host.name}: rules in force")
        print("\n".join(f"  {line}" for line in state.rules) or "  (none)")
        if state.diff:
            print(f"{outcome.host.name}: difference\n" +
                  "\n".join(f"  {line}" for line in state.diff.splitlines()))
    bad = [o.host.name for o in outcomes if not o.ok or not o.value.as_planned]
    if bad:
        raise Exit(f"error: {', '.join(bad)} not as planned; run inv net.apply (see above)",
                   code=1)
