"""One-off commands in a fresh container of the release an app host runs (app.exec, app.flask).

The container is `docker compose run` of the host's own project: the same image, environment
file and networks as the running service, no published ports, no dependencies started, removed
when the command ends. A release's entrypoint starts its server whatever arguments it is given,
so the command's first word becomes the entrypoint and the others its arguments, each quoted once.
A deploy holding the inventory's lock refuses the command unless forced: the deploy may be
replacing the very container or migrating the database under it.
"""

from __future__ import annotations

import sys

from tasks.core import shell
from tasks.core.errors import InputError, Problem
from tasks.core.hosts import connect
from tasks.core.inventory import APP_ROLES, Host, Inventory
from tasks.core.lock import Locked, describe, held
from tasks.core.project import display
from tasks.tiers.app import compose, deploy_dir, services_of


def one_off_command(inventory: Inventory, service: str, words: list[str],
                    interactive: bool) -> str:
    """The compose command running ``words`` in a fresh container of ``service``; with a
    terminal when interactive (compose's -T otherwise: the caller has none)."""
    if not words:
        raise InputError([Problem("the command line", "--", "no command after `--`",
                                  "name the command after a bare `--`, e.g. "
                                  "inv app.exec -- flask --help")])
    program, *arguments = words
    terminal = [] if interactive else ["-T"]
    return " ".join([compose(deploy_dir(inventory)), "run", "--rm", "--no-deps", *terminal,
                     "--entrypoint", shell.quote(program), shell.quote(service),
                     *map(shell.quote, arguments)])


def host_running(inventory: Inventory, service: str, name: str = "") -> Host:
    """The host to run a one-off ``service`` container on: ``name``, which must run the
    service, else the first app host that runs it."""
    running = [h for h in inventory.with_role(*APP_ROLES) if service in services_of(inventory, h)]
    shown = display(inventory.file)
    if not running:
        raise InputError([Problem(shown, "hosts", f"no host runs the service {service!r}",
                                  "choose a service of the app tier (api, worker_<group>, "
                                  "worker_beat, web, plugin_daemon, ...) with --service")])
    if not name:
        return running[0]
    chosen = inventory.host(name)
    if chosen not in running:
        raise InputError([Problem("--host", name, f"{name} does not run {service}",
                                  f"use one of: {', '.join(h.name for h in running)}")])
    return chosen


def run_one_off(inventory: Inventory, words: list[str], *, service: str = "api",
                host: str = "", interactive: bool = False, force: bool = False) -> int:
    """Run the command on the chosen host with this terminal; its exit status. Refused while
    a deploy of the inventory holds the lock, unless forced."""
    command = one_off_command(inventory, service, words, interactive)
    chosen = host_running(inventory, service, host)
    deploying = held(inventory.name)
    if deploying and not force:
        raise Locked(f"a deploy of inventory {inventory.name} is running: {describe(deploying)}."
                     f" Run the command after it, or pass --force to run it now")
    # The arguments may hold a password (reset-password): the program's name only.
    print(f"[app] {chosen.name}: `{words[0]}` in a fresh {service} container", file=sys.stderr,
          flush=True)
    machine = connect(chosen, inventory.settings.timeouts)
    try:
        return machine.attach(command, interactive=interactive)
    finally:
        machine.close()
