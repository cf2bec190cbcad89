"""Dify releases on the app hosts: migrate once, upgrade one host at a time, roll back.

- The migration runs once, on the migration host (the first api host), in a one-off container
  of the TARGET release's api image, before any api, worker or web is replaced. Afterwards the
  database's alembic revision (table alembic_version of the dify database, read on the database
  primary) must equal the image's head (`flask db heads` in that image): `flask upgrade-db`
  exits 0 even when it skipped because another process held its lock, or when it failed.
- An upgrade: preflight (profiles, rules, plans, images pulled or shipped on every host) ->
  database backup (backup.run, verified) -> the migration -> the release steps -> api and
  web hosts one at a time behind the load balancer -> worker and beat hosts.
- An upgrade may cross several releases (1.13.3 -> 1.16.1): the target's migration chain holds
  every revision in between. The steps each crossed release declares in its profile (e.g. 1.15's
  `flask backfill-plugin-auto-upgrade`) then run once each, oldest release first, in a one-off
  container of the target's api image; the history records which ran, so a resumed upgrade does
  not run them again.
- The history of releases (version, images, alembic revision after, backup taken before) is kept
  on every api host in HISTORY_FILE. A rollback goes back to the release before the last upgrade
  when the database is still at that release's revision; when a migration ran in between it
  refuses and names the backup to restore first.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from datetime import UTC, datetime

from tasks.backups import engine as backups
from tasks.core import placement, rules, shell
from tasks.core.apply import Executor
from tasks.core.errors import DifyopsError, InputError, Problem
from tasks.core.fleet import each_host
from tasks.core.hosts import Machine, connect
from tasks.core.inventory import APP_ROLES, Host, Inventory
from tasks.core.plan import HostPlan, WriteFile
from tasks.core.profiles import available_versions, load_profile, steps_between, version_key
from tasks.core.project import display
from tasks.core.render import Renderer
from tasks.core.report import Report
from tasks.core.rollout import HostAction, Outcome, no_op, roll
from tasks.tiers import app as tier
from tasks.tiers import lb_ops

HISTORY_FILE = "/var/lib/difyops/dify-releases.json"
HEAD = re.compile(r"^(\S+) \(head\)", re.M)


class ReleaseError(DifyopsError):
    """A release operation stopped; the message says where things stand and what to do."""


# --- inventories for another release -------------------------------------------------------


def with_release(inventory: Inventory, version: str, images: dict[str, str] | None = None,
                 check: bool = True) -> Inventory:
    """The inventory as it would be with another Dify version (and exact images, if given)."""
    if version not in available_versions():
        raise InputError([Problem("--version", version, f"no profile for Dify {version}",
                                  f"use one of {', '.join(available_versions())} or add "
                                  f"config/profiles/{version}.yml")])
    dify = inventory.settings.dify.replace(version=version)
    if images is not None:  # names exactly as recorded: no prefix added again
        dify = dify.replace(images=images, registry_mirror="", private_registry="")
    settings = inventory.settings.replace(dify=dify)
    profile = load_profile(version)
    target = dataclasses.replace(inventory, settings=settings, profile=profile,
                                 hosts=placement.place_defaults(inventory.hosts, profile))
    problems = rules.check(target) if check else []
    if problems:
        raise InputError(problems)
    return target


def components(inventory: Inventory) -> dict[str, str]:
    """component -> image of every Dify component the inventory's app hosts run."""
    found: dict[str, str] = {}
    for host in inventory.with_role(*APP_ROLES):
        found.update(tier.host_images(inventory, host))
    return found


def entry(inventory: Inventory, action: str, alembic: str | None, backup: str = "") -> dict:
    """One line of the release history."""
    return {"version": inventory.profile.version, "images": components(inventory),
            "alembic": alembic or "", "backup": backup, "action": action,
            "at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}


# --- reading the hosts ---------------------------------------------------------------------


def read_json(machine: Machine, path: str) -> object | None:
    """A JSON file on a host, or None when it does not exist."""
    content = machine.read_file(path)
    if content is None:
        return None
    try:
        return json.loads(content)
    except ValueError as exc:
        raise ReleaseError(f"{machine.host.target}: {path} is not valid JSON ({exc}): "
                           f"fix or remove it") from exc


def deployed(inventory: Inventory) -> dict[str, dict | None]:
    """host name -> the release.json it holds (None: never deployed by this version of
    difyops); an unreachable host is an error."""
    path = f"{tier.deploy_dir(inventory)}/release.json"
    outcomes = each_host(inventory.with_role(*APP_ROLES), lambda m: read_json(m, path),
                         inventory.settings.timeouts)
    errors = [o.error for o in outcomes if not o.ok]
    if errors:
        raise ReleaseError("cannot read what the app hosts run:\n  " + "\n  ".join(errors))
    return {o.host.name: o.value for o in outcomes}


def read_history(inventory: Inventory) -> list[dict]:
    """The release history: the longest copy among the api hosts that answer."""
    outcomes = each_host(inventory.with_role("api"), lambda m: read_json(m, HISTORY_FILE),
                         inventory.settings.timeouts)
    copies = [o.value for o in outcomes if o.ok and isinstance(o.value, list)]
    if not copies and not any(o.ok for o in outcomes):
        raise ReleaseError("no api host answers: " + "; ".join(o.error for o in outcomes))
    return max(copies, key=len) if copies else []


def write_history(inventory: Inventory, history: list[dict]) -> list[str]:
    """Write the history on every api host; returns the hosts that could not be written."""
    content = (json.dumps(history, indent=2) + "\n").encode()
    outcomes = each_host(inventory.with_role("api"),
                         lambda m: m.install_file(HISTORY_FILE, content),
                         inventory.settings.timeouts)
    return [o.host.name for o in outcomes if not o.ok]


def database_revision(inventory: Inventory) -> str | None:
    """The dify database's alembic revision, read with psql on the database primary (None: no
    alembic_version table or no row yet)."""
    primary = inventory.with_role("db_primary")[0]
    port = inventory.settings.db.port
    machine = connect(primary, inventory.settings.timeouts)
    try:
        result = machine.run(f"runuser -u postgres -- psql -p {port} -d dify -AtX -c "
                             f"'SELECT version_num FROM alembic_version'")
    finally:
        machine.close()
    if not result.ok:
        if "does not exist" in result.stderr:
            return None
        raise ReleaseError(f"cannot read the alembic revision on {primary.target}: "
                           f"{result.answer}")
    return result.stdout.strip() or None


def image_head(machine: Machine, inventory: Inventory) -> str:
    """The alembic head of the api image named in the migration project (`flask db heads`)."""
    result = machine.run(f"{tier.migration_compose(inventory)} run --rm -T --entrypoint flask "
                         f"migration db heads")
    heads = HEAD.findall(result.stdout)
    if not result.ok or len(heads) != 1:
        raise ReleaseError(f"cannot read the alembic head of {inventory.image('api')} on "
                           f"{machine.host.target}: "
                           + (result.answer if not result.ok else
                              f"expected one head, `flask db heads` printed {heads or 'none'}"))
    return heads[0]


# --- images on the hosts -------------------------------------------------------------------


def ensure_images(inventory: Inventory, hosts: list[Host]) -> None:
    """Every image the hosts will run is in their engines: present, else pulled; else fail
    before anything changes, naming what to ship."""

    def check(machine: Machine) -> None:
        wanted = sorted(set(tier.host_images(inventory, machine.host).values()))
        missing = [image for image in wanted
                   if not machine.run(f"docker image inspect {shell.quote(image)} "
                                      f">/dev/null 2>&1").ok]
        failed = [image for image in missing
                  if not machine.run(f"docker pull -q {shell.quote(image)}").ok]
        if failed:
            raise ReleaseError(f"{machine.host.name}: missing and not pullable: "
                               f"{', '.join(failed)}")

    outcomes = each_host(hosts, check, inventory.settings.timeouts)
    errors = [o.error for o in outcomes if not o.ok]
    if errors:
        raise ReleaseError(f"images of Dify {inventory.profile.version} are missing (nothing "
                           f"was changed):\n  " + "\n  ".join(errors) +
                           f"\n  fix: inv images.sync --version {inventory.profile.version}")


# --- migration -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Migration:
    """What one migration run found and left."""

    before: str | None
    after: str | None
    head: str
    ran: bool
    output: str = ""


def migrate(inventory: Inventory, report: Report) -> Migration:
    """Run the one migration of the inventory's release on the migration host and verify it."""
    host = tier.migration_host(inventory)
    plan = [step for step in tier.steps(inventory, Renderer(inventory), host,
                                        release_guard=False)
            if isinstance(step, WriteFile) and "/migration/" in step.path]
    executor = Executor(report, timeouts=inventory.settings.timeouts)
    try:
        report.expect(host.name)
        if not executor.run_host("app", HostPlan(host, plan)):
            raise ReleaseError(f"cannot write the migration project on {host.target}: see above")
        machine = executor.machine(host)
        head = image_head(machine, inventory)
        before = database_revision(inventory)
        if before == head:
            report.note(f"[app] {host.name}: database already at {head}, the head of "
                        f"{inventory.image('api')}: no migration needed")
            return Migration(before, before, head, ran=False)
        report.note(f"[app] {host.name}: migrating the database from {before or '(empty)'} to "
                    f"{head} with {inventory.image('api')} (one run)")
        result = machine.run(f"{tier.migration_compose(inventory)} run --rm -T migration")
        output = (result.stdout + result.stderr).strip()
        after = database_revision(inventory)
    finally:
        executor.close()
    tail = "\n".join(f"      {line}" for line in output.splitlines()[-8:])
    if not result.ok:
        raise ReleaseError(f"the migration failed on {host.target} (exit {result.exited}); "
                           f"the database is at {after or '(empty)'}:\n{tail}")
    if after != head:
        raise ReleaseError(
            f"the migration exited 0 on {host.target}, but the database is at alembic "
            f"revision {after or '(none)'} while {inventory.image('api')} expects its head "
            f"{head}: `flask upgrade-db` skipped (another process held db_upgrade_lock) or "
            f"failed. Its output:\n{tail}")
    report.note(f"[app] {host.name}: database at {after}, the image's head")
    return Migration(before, after, head, ran=True, output=output)


# --- rolling replacement -------------------------------------------------------------------


@dataclasses.dataclass
class Hooks:
    """What an upgrade calls outside the app tier: the load balancer and the backup tier."""

    drain: HostAction = no_op
    undrain: HostAction = no_op
    backup: Callable[[str], str] | None = None
    load_balanced: bool = False
    # Hosts that leave the load balancer while they are replaced: only those that share an
    # upstream with another host (the sole member of an upstream cannot leave it).
    drainable: Callable[[Host], bool] = lambda host: False

    @classmethod
    def for_inventory(cls, inventory: Inventory) -> Hooks:
        """The lb tier's drain/undrain (when there is a balancer) and the backup tier's run."""
        shared = [role for role in ("api", "web") if len(inventory.with_role(role)) > 1]
        balanced = bool(inventory.with_role("lb"))
        return cls(drain=lambda name: lb_ops.drain(inventory, name),
                   undrain=lambda name: lb_ops.undrain(inventory, name),
                   backup=lambda reason: backups.backup_now(inventory).id,
                   load_balanced=balanced,
                   drainable=lambda host: balanced and host.has(*shared))


def order(inventory: Inventory) -> tuple[list[Host], list[Host]]:
    """(hosts behind the load balancer: api hosts then web hosts; the other app hosts)."""
    front = [*inventory.with_role("api"),
             *[h for h in inventory.with_role("web") if not h.has("api")]]
    names = {h.name for h in front}
    back = [h for h in inventory.with_role(*APP_ROLES) if h.name not in names]
    return front, back


def replace(target: Inventory, previous: Inventory | None, hooks_: Hooks,
            report: Report) -> Outcome:
    """Roll the target release over the app hosts: front hosts one at a time, then the rest."""
    renderer = Renderer(target)
    front, back = order(target)

    def plan(inventory: Inventory, host: Host, shared: Renderer) -> HostPlan:
        return HostPlan(host, tier.steps(inventory, shared, host, release_guard=False,
                                         migrate=False))

    restore = None
    if previous is not None:
        old = Renderer(previous)
        restore = lambda host: plan(previous, host, old)  # noqa: E731
    timeouts = target.settings.timeouts
    outcome = roll("app", [plan(target, h, renderer) for h in front], report=report,
                   timeouts=timeouts, drain=hooks_.drain, undrain=hooks_.undrain,
                   behind_lb=hooks_.drainable,
                   restore=restore)
    if not outcome.ok:
        outcome.untouched += [h.name for h in back]
        return outcome
    rest = roll("app", [plan(target, h, renderer) for h in back], report=report,
                timeouts=timeouts, behind_lb=lambda host: False, restore=restore)
    rest.replaced = outcome.replaced + rest.replaced
    rest.unchanged = outcome.unchanged + rest.unchanged
    return rest


def describe(outcome: Outcome, target: Inventory, previous: Inventory | None) -> str:
    """Where a stopped rollout left things, for the operator."""
    old = f"Dify {previous.profile.version}" if previous else "the release they ran"
    lines = [f"stopped at {outcome.failed}: {outcome.reason}"]
    if outcome.replaced:
        lines.append(f"on Dify {target.profile.version}: {', '.join(outcome.replaced)}")
    if outcome.untouched:
        lines.append(f"not touched, still serving {old}: {', '.join(outcome.untouched)}")
    if outcome.restored:
        lines.append(f"{outcome.failed} was put back on {old}"
                     + (" but is still out of the load balancer" if outcome.left_drained
                        else " and is back in service (healthy again before it re-entered "
                             "the load balancer)" if outcome.drained
                        else " and answers healthy again"))
    elif outcome.restore_error:
        lines.append(f"putting {old} back on {outcome.failed} failed too: "
                     f"{outcome.restore_error}")
    if outcome.left_drained:
        lines.append(f"{outcome.failed} is out of the load balancer: fix it, then rerun "
                     f"(or inv lb.undrain --host {outcome.failed} once it is healthy)")
    return "\n  ".join(lines)


def next_steps(outcome: Outcome, version: str, migrated_since: str, backup: str) -> str:
    """What an operator does after an upgrade stopped at a host."""
    back = "inv app.rollback"
    if migrated_since:
        back += (f" (the database was migrated to {migrated_since}: the rollback will ask for "
                 + (f"backup {backup}" if backup else "a backup taken before the upgrade")
                 + " to be restored first)")
    return (f"next: fix what stopped {outcome.failed} (the reason above; `docker compose -p "
            f"dify logs` on {outcome.failed} shows its services' logs; inv images.sync --version "
            f"{version} ships the release's images again where a host holds other ones), "
            f"then rerun inv app.upgrade --version {version}: it resumes at {outcome.failed} "
            f"and leaves the hosts already on {version} alone. To go back instead: {back}")


# --- the verbs -----------------------------------------------------------------------------


def observed_entry(inventory: Inventory) -> dict:
    """The release the app hosts run as their release.json files say (before any history)."""
    records = [r for r in deployed(inventory).values() if r]
    if not records:
        raise ReleaseError("no Dify release is deployed on the app hosts yet: deploy one with "
                           "inv app.deploy")
    versions = sorted({r["version"] for r in records})
    if len(versions) > 1:
        raise ReleaseError(f"the app hosts run different Dify versions ({', '.join(versions)}) "
                           f"and no history says which is current: deploy one release with "
                           f"inv app.deploy first")
    images: dict[str, str] = {}
    for record in records:
        images.update(record["images"])
    return {"version": versions[0], "images": images, "alembic": database_revision(inventory)
            or "", "backup": "", "action": "deployed", "complete": True,
            "at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}


def check_step(current: str, version: str) -> None:
    """Forward only: a downgrade is a rollback."""
    if version_key(version) < version_key(current):
        raise InputError([Problem("--version", version,
                                  f"older than the running Dify {current}",
                                  "go back with inv app.rollback (a downgrade is a rollback)")])


def run_release_steps(inventory: Inventory, since: str, done: list[str], report: Report,
                      record: Callable[[str], None]) -> None:
    """The steps of every release after `since` up to the inventory's, oldest first, each once:
    those named in `done` ("<version>:<name>") are skipped; `record` is told of each that ran,
    right after it ran."""
    todo = [(version, step) for version, step in steps_between(since, inventory.profile.version)
            if f"{version}:{step.name}" not in done]
    if not todo:
        return
    host = tier.migration_host(inventory)
    machine = connect(host, inventory.settings.timeouts)
    try:
        for version, step in todo:
            report.note(f"[app] {host.name}: release step of Dify {version}: flask "
                        f"{' '.join(step.command)} ({step.why})")
            result = machine.run(f"{tier.migration_compose(inventory)} run --rm -T --entrypoint "
                                 f"flask migration {shell.words(*step.command)}")
            if not result.ok:
                tail = "\n".join(f"      {line}" for line in
                                 (result.stdout + result.stderr).strip().splitlines()[-8:])
                raise ReleaseError(f"the release step {step.name} of Dify {version} failed on "
                                   f"{host.target} (exit {result.exited}); the database is "
                                   f"migrated, no host was replaced yet. Fix the cause and rerun "
                                   f"the upgrade: steps that ran are not run again.\n{tail}")
            record(f"{version}:{step.name}")
    finally:
        machine.close()


def upgrade(inventory: Inventory, version: str, report: Report,
            hooks_: Hooks | None = None) -> Outcome:
    """The whole upgrade (module doc); raises ReleaseError with the state when it stops.

    Rerunning an upgrade that stopped resumes it: the migration is skipped when the database is
    at the head already, and hosts already on the target are left alone.
    """
    hooks_ = hooks_ or Hooks.for_inventory(inventory)
    target = with_release(inventory, version)
    front, back = order(target)
    for host in front + back:  # every plan renders before anything is touched
        tier.steps(target, Renderer(target), host, release_guard=False)
    history = read_history(inventory) or [observed_entry(inventory)]
    last = history[-1]
    resuming = last["version"] == version and last["action"] == "upgrade"
    if resuming:
        report.note(f"[app] resuming the upgrade to Dify {version} recorded at {last['at']}")
        before = history[-2] if len(history) > 1 else None
    else:
        check_step(last["version"], version)
        before = last
    previous = (with_release(inventory, before["version"], before["images"], check=False)
                if before else None)
    ensure_images(target, front + back)
    backup_id = last.get("backup", "") if resuming else ""
    if resuming:
        report.note("[app] the backup was taken when this upgrade started" if backup_id else
                    "[app] no backup was taken when this upgrade started")
    elif hooks_.backup is not None:
        report.note(f"[app] backing up the databases before the upgrade to Dify {version}")
        backup_id = hooks_.backup(f"before the upgrade to Dify {version}")
        report.note(f"[app] backup {backup_id} taken")
    else:
        report.note("[app] no backup step given: no backup taken. A rollback across this "
                    "migration will need a backup of your own.")
    if not hooks_.load_balanced:
        report.note("[app] no load balancer hooks registered: hosts are replaced one at a time "
                    "without being drained (nginx retries idempotent requests on the others)")
    migration = migrate(target, report)
    record = {**entry(target, "upgrade", migration.after, backup_id), "complete": False,
              "steps": list(last.get("steps", [])) if resuming else []}
    if resuming:
        history[-1] = {**record, "at": last["at"]}
    else:
        history.append(record)
    write_history(inventory, history)

    def step_ran(name: str) -> None:
        history[-1]["steps"].append(name)
        write_history(inventory, history)

    run_release_steps(target, before["version"] if before else version,
                      list(history[-1]["steps"]), report, step_ran)
    if history[-1]["steps"]:
        report.note(f"[app] release steps run: {', '.join(history[-1]['steps'])}")
    outcome = replace(target, previous, hooks_, report)
    if outcome.ok:
        history[-1]["complete"] = True
        unwritten = write_history(inventory, history)
        if unwritten:
            report.note(f"[app] could not record the release on {', '.join(unwritten)}")
        return outcome
    migrated = (migration.after or "") if before is None or \
        (migration.after or "") != before.get("alembic", "") else ""
    raise ReleaseError(f"the upgrade to Dify {version} stopped:\n  "
                       + describe(outcome, target, previous)
                       + (f"\n  the database is at {migration.after} (migrated)"
                          if migration.ran else "")
                       + "\n  " + next_steps(outcome, version, migrated, backup_id))


def rollback(inventory: Inventory, report: Report, hooks_: Hooks | None = None) -> Outcome:
    """Back to the release before the last upgrade, when the database allows it."""
    hooks_ = hooks_ or Hooks.for_inventory(inventory)
    history = read_history(inventory)
    if len(history) < 2:
        raise ReleaseError("no earlier release is recorded on the api hosts: app.rollback goes "
                           "back to the release before the last inv app.upgrade")
    current, previous = history[-1], history[-2]
    if current["action"] == "rollback":
        raise ReleaseError(f"the last change already was a rollback to Dify "
                           f"{current['version']}: go forward with inv app.upgrade")
    live = database_revision(inventory)
    if live != previous["alembic"]:
        backup = current.get("backup") or ""
        where = (f"backup {backup}, taken before that upgrade (inv backup.restore)" if backup
                 else f"a backup taken before {current['at']} (the upgrade ran without the "
                      f"backup tier, so difyops recorded none)")
        raise ReleaseError(
            f"Dify {previous['version']} needs the database at alembic revision "
            f"{previous['alembic'] or '(empty)'}, but it is at {live or '(empty)'}: the upgrade "
            f"to {current['version']} migrated it, and the old release cannot run on the new "
            f"schema (\"Can't locate revision\"). A rollback across a migration is a restore: "
            f"restore {where}, then run inv app.rollback again. Nothing was changed.")
    target = with_release(inventory, previous["version"], previous["images"], check=False)
    now = with_release(inventory, current["version"], current["images"], check=False)
    front, back = order(target)
    ensure_images(target, front + back)
    outcome = replace(target, now, hooks_, report)
    if not outcome.ok:
        raise ReleaseError(f"the rollback to Dify {previous['version']} stopped:\n  "
                           + describe(outcome, target, now))
    history.append({**previous, "action": "rollback", "alembic": live or "", "backup": "",
                    "complete": True, "at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")})
    write_history(inventory, history)
    return outcome


def reminder(inventory: Inventory, version: str) -> str:
    """What to change in the inventory so that deploys keep the release now running."""
    if inventory.profile.version == version:
        return ""
    return (f"set `dify.version: \"{version}\"` in {display(inventory.file)}: deploys refuse "
            f"to run another release than the hosts run")
