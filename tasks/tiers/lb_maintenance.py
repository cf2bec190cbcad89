"""Maintenance mode of the balancers: `inv lb.maintenance on|off`.

On: every lb host gets the two pages of the mode (tasks/tiers/lb.py: MAINTENANCE), the JSON one
first, then the HTML one whose existence nginx checks on every request: from then on it answers
503 with Retry-After and the page (JSON on the api's routes), except to net.management and on
/health. Off: the HTML page goes first. No reload either way, and a deploy leaves the pages
alone, so the mode holds until it is turned off. The message is escaped for each page.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

from tasks.core import shell
from tasks.core.errors import DifyopsError, HostError, InputError, Problem
from tasks.core.fleet import Outcome, each_host
from tasks.core.hosts import Machine
from tasks.core.inventory import Inventory
from tasks.tiers.lb import MAINTENANCE

DEFAULT_MESSAGE = "Dify is under maintenance and will be back shortly."
MAX_MESSAGE = 500
STATES = ("on", "off")
HTML_PATH = f"{MAINTENANCE['dir']}/{MAINTENANCE['html']}"
JSON_PATH = f"{MAINTENANCE['dir']}/{MAINTENANCE['json']}"


def checked(state: str, message: str) -> str:
    """The message to show (the default when empty); refuses a state other than on/off and a
    message with control characters or longer than MAX_MESSAGE."""
    if state not in STATES:
        raise InputError([Problem("the command line", "state", f"{state!r} is not on or off",
                                  "inv lb.maintenance on [--message TEXT], or "
                                  "inv lb.maintenance off")])
    text = message.strip() or DEFAULT_MESSAGE
    if len(text) > MAX_MESSAGE or any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise InputError([Problem("--message", text[:40], f"must be one line of at most "
                                                         f"{MAX_MESSAGE} characters",
                                  "shorten it; no newlines or control characters")])
    return text


def pages(message: str) -> dict[str, bytes]:
    """path -> content of the two pages, the message escaped for each."""
    page = ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<title>Under maintenance</title></head>\n<body><h1>Under maintenance</h1>\n"
            f"<p>{html.escape(message)}</p></body></html>\n")
    answer = json.dumps({"code": "maintenance", "message": message, "status": 503})
    return {JSON_PATH: (answer + "\n").encode(), HTML_PATH: page.encode()}


def switch_on(machine: Machine, message: str) -> bool:
    """The pages written (the HTML one last: it turns the mode on); whether any changed."""
    changed = False
    for path, content in pages(message).items():
        changed = machine.install_file(path, content, mode=0o644) or changed
    return changed


def switch_off(machine: Machine) -> bool:
    """The pages removed (the HTML one first: it turns the mode off); whether it was on."""
    was_on = machine.probe(f"test -e {shell.quote(HTML_PATH)}")
    machine.check(f"rm -f {shell.quote(HTML_PATH)} {shell.quote(JSON_PATH)}")
    return was_on


def switch(inventory: Inventory, state: str, message: str = "") -> list[Outcome[bool]]:
    """Turn the mode on or off on every lb host, in parallel: whether each changed."""
    text = checked(state, message)

    def one(machine: Machine) -> bool:
        return switch_on(machine, text) if state == "on" else switch_off(machine)

    return each_host(inventory.with_role("lb"), one, inventory.settings.timeouts)


def ensure(inventory: Inventory, state: str, message: str = "") -> None:
    """Turn the mode on or off on every lb host, or stop, naming the hosts that failed."""
    failed = [f"{o.host.name}: {o.error}" for o in switch(inventory, state, message) if not o.ok]
    if failed:
        raise HostError(f"maintenance could not be turned {state}: " + "; ".join(failed))
    print(f"[lb] maintenance {state} on every balancer", flush=True)


@contextmanager
def held_during(inventory: Inventory, message: str) -> Iterator[None]:
    """The mode on for the block and off once it succeeded; left on when it failed (the
    release may be half replaced), which the error then says."""
    ensure(inventory, "on", message)
    try:
        yield
    except DifyopsError as exc:
        raise DifyopsError(f"{exc}\nThe balancers stay in maintenance: once Dify serves "
                           f"again, run inv lb.maintenance off") from None
    ensure(inventory, "off")


def state_of(machine: Machine) -> str:
    """'on since <UTC time>' or 'off' on one lb host."""
    result = machine.check(f"stat -c %Y {shell.quote(HTML_PATH)} 2>/dev/null || echo off")
    answer = result.stdout.strip()
    if answer == "off":
        return "off"
    since = datetime.fromtimestamp(int(answer), UTC).isoformat(timespec="seconds")
    return f"on since {since}"


def states(inventory: Inventory) -> list[Outcome[str]]:
    """The mode of every lb host, in parallel."""
    return each_host(inventory.with_role("lb"), state_of, inventory.settings.timeouts)
