"""lb: the nginx load balancer in front of Dify."""

from __future__ import annotations

from invoke import Context, task
from invoke.exceptions import Exit

from tasks.core.cli import deploy_task, load, reported
from tasks.core.fleet import table
from tasks.tiers import lb_maintenance, lb_ops
from tasks.tiers.lb import TIER

deploy = deploy_task(TIER)


@task
@reported
def status(ctx: Context) -> None:
    """Show each lb host: nginx, config test, published site, /health, upstreams and drains."""
    inventory = load(ctx)
    outcomes = lb_ops.status(inventory)
    modes = {o.host.name: o.value if o.ok else o.error for o in lb_maintenance.states(inventory)}
    rows, members = [], []
    for outcome in outcomes:
        if not outcome.ok or outcome.value is None:
            rows.append([outcome.host.name, "unreachable", "-", "-", "-", outcome.error])
            continue
        state = outcome.value
        rows.append([state.lb, state.nginx, state.health, state.published,
                     modes.get(state.lb, "?"), state.config])
        for server in state.servers:
            members.append([state.lb, server.upstream, server.host, server.endpoint,
                            "drained (down)" if server.down else "in service"])
    print(table(["lb", "nginx", "/health", "published", "maintenance", "nginx -t"], rows))
    if members:
        print()
        print(table(["lb", "upstream", "host", "server", "state"], members))
    bad = [o.host.name for o in outcomes if not (o.ok and o.value and o.value.ok)]
    if bad:
        raise Exit(f"error: load balancer(s) not healthy: {', '.join(bad)}; see above "
                   f"(`inv lb.deploy` installs and publishes the site)", code=1)


@task
@reported
def check(ctx: Context) -> None:
    """Probe every Dify route through each lb host and show which upstream answered."""
    inventory = load(ctx)
    outcomes = lb_ops.check(inventory)
    rows, failed = [], []
    for outcome in outcomes:
        if not outcome.ok or outcome.value is None:
            rows.append([outcome.host.name, "-", "-", "-", "-", f"FAILED: {outcome.error}"])
            failed.append(outcome.host.name)
            continue
        for probe in outcome.value:
            rows.append([probe.lb, probe.path, probe.expected, probe.status or "no answer",
                         " -> ".join(probe.answered_by) or "-", "ok" if probe.ok else "WRONG"])
            if not probe.ok:
                failed.append(f"{probe.lb} {probe.path}")
    print(table(["lb", "path", "expected", "status", "answered by", ""], rows))
    if failed:
        raise Exit(f"error: {len(failed)} probe(s) failed: {', '.join(failed)}. A 5xx or a "
                   f"wrong upstream: see `inv lb_ops.status` and the hosts behind it", code=1)


def _print_moves(results: list[lb_ops.DrainResult], host: str, verb: str) -> None:
    for result in results:
        what = "changed" if result.changed else "already so, nothing changed"
        line = f"{result.lb}: {host} {verb} {', '.join(result.upstreams) or 'no upstream'}: {what}"
        if result.kept_in:
            line += f"; stays in {', '.join(result.kept_in)} (its only server)"
        if result.waited >= 0.5:
            line += f"; requests in flight finished after {result.waited:.1f} s"
        print(line)


@task(help={"host": "the inventory host to take out of rotation (an api, web or plugin host)",
            "wait": "seconds to wait for its requests in flight (default: lb_ops.drain_wait; "
                    "0: do not wait)"})
@reported
def drain(ctx: Context, host: str, wait: int = -1) -> None:
    """Take HOST out of every upstream on every lb host; in-flight requests finish."""
    inventory = load(ctx)
    results = lb_ops.drain(inventory, host, wait=None if wait < 0 else wait)
    _print_moves(results, host, "out of")


@task(help={"host": "the drained inventory host to put back into rotation"})
@reported
def undrain(ctx: Context, host: str) -> None:
    """Put HOST back into every upstream on every lb host (graceful reload)."""
    inventory = load(ctx)
    _print_moves(lb_ops.undrain(inventory, host), host, "back in")


@task(help={"state": "on: answer 503 and a maintenance page; off: serve again",
            "message": f"the page's text (default: {lb_maintenance.DEFAULT_MESSAGE!r})"})
@reported
def maintenance(ctx: Context, state: str, message: str = "") -> None:
    """Every balancer answers 503 with a maintenance page (on), or serves again (off); requests
    from net.management and /health still pass. Kept across deploys until turned off."""
    inventory = load(ctx)
    outcomes = lb_maintenance.switch(inventory, state, message)
    print(table(["lb", "maintenance", "changed"],
                [(o.host.name, state if o.ok else "UNKNOWN", "yes" if o.value else o.error or "no")
                 for o in outcomes]))
    failed = [o.host.name for o in outcomes if not o.ok]
    if failed:
        raise Exit(f"error: maintenance could not be turned {state} on {', '.join(failed)}; "
                   f"run the command again", code=1)
