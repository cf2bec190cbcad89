"""Benchmark: requests through the load balancer while two api hosts change Dify release.

Two labs, chosen by --images:
- ``standin`` (default): the lab of the app tier's integration tests
  (tests/integration/app_lab.py: PostgreSQL, Redis and the nginx load balancer on one host, two
  api hosts, a worker/web host, stand-in Dify images), from Dify 1.5.1 to 1.13.3.
- ``real``: the lab of the real-Dify tests (tests/integration/real_lab.py: the real api, worker
  and beat built from the releases' source, PostgreSQL with a standby, Redis with Sentinel, two
  api hosts), from 1.13.3 to 1.14.2 with the releases' own migrations.

Deployed on the older release by the real tasks, a steady load of GET /console/api/setup (an
api route that reads the database) goes through nginx at a fixed rate while, in turn:

1. difyops: `inv app.upgrade --version NEW` (backup, one migration, api hosts one at a time
   out of the nginx upstream, replaced, healthy, back; then the other app hosts).
   Then back to the old release: with stand-ins, the schema as a restore would leave it; with
   the real images, `inv backup.restore` of the backup the upgrade took; then `inv app.rollback`.
2. the seed's way: its upgrade is production-deploy.sh run again with the new VERSION: `docker
   pull`, then `docker-compose -f api-cluster.yml up -d`, which recreates every api container
   at once, with no drain and no health gate (then `sleep 30`). Mimicked here with the 1.13.3
   compose file and environment in place on both api hosts (as difyops renders them, with
   MIGRATION_ENABLED=true, Dify's default, which the seed never turns off: the api containers
   migrate as they start) and `docker compose up -d --no-deps api` started on both api hosts
   at the same time.
3. the seed's recovery script's step, literally: `docker compose restart api` on both api hosts
   at the same time (same release).

First the same load runs for --baseline seconds with nothing changing (the reference). Each
run keeps the load for --tail seconds after the operation (for 2 and 3: after every api answers
healthy again and then nginx answers 10 requests in a row: nginx keeps a server it saw fail out
of its upstream for lb.fail_timeout seconds). Prints, side by side: requests sent, failed (no
answer or not 2xx), p50/p99 latency, the seconds loaded, and the ratios. Asserts nothing.

Needs a Docker engine (like the integration tests). Run: python benchmarks/upgrade.py
[--images standin|real] [--rate N] [--threads N] [--tail S] [--baseline S]
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.images import standin
from tests.integration import real_lab
from tests.integration.app_lab import DEPLOY, ROOT, A, App, B, start_app
from tests.integration.lab import Lab
from tests.integration.support import SteadyLoad

APIS = ("app-api1", "app-api2")


def healthy(app: App, version: str) -> bool:
    """Every api host answers /health "ok" from the given release."""
    import requests

    for name in APIS:
        try:
            body = requests.get(f"http://{app.hosts[name].address}:5001/health",
                                timeout=2).json()
        except (requests.RequestException, ValueError):
            return False
        if (body.get("status"), body.get("version")) != ("ok", version):
            return False
    return True


def wait_healthy(app: App, version: str, timeout: float = 300) -> float:
    """Seconds until every api host answers healthy from `version`."""
    started = time.monotonic()
    while not healthy(app, version):
        if time.monotonic() - started > timeout:
            raise SystemExit(f"the api hosts did not answer healthy on {version} after "
                             f"{timeout:g} s")
        time.sleep(0.2)
    return time.monotonic() - started


def timed_inv(app: App, since: float, *args: str) -> list[tuple[float, str]]:
    """`inv ARGS` with each line it prints and when (seconds after `since`); fails on error."""
    process = subprocess.Popen([sys.executable, "-m", "invoke", *args], cwd=ROOT, text=True,
                               env={**app.env, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
    lines = [(time.monotonic() - since, line.rstrip()) for line in process.stdout]
    if process.wait():
        raise SystemExit(f"inv {' '.join(args)} failed:\n" + "\n".join(t for _, t in lines))
    return lines


def wait_answering(url: str, timeout: float = 180, streak: int = 10) -> None:
    """Until `streak` requests in a row through nginx answer 2xx (nginx keeps a server it saw
    fail out of its upstream for lb.fail_timeout seconds, even when the server is back)."""
    import requests

    started, good = time.monotonic(), 0
    while good < streak:
        if time.monotonic() - started > timeout:
            raise SystemExit(f"nginx did not answer again after {timeout:g} s")
        try:
            good = good + 1 if requests.get(url, timeout=2).ok else 0
        except requests.RequestException:
            good = 0
        time.sleep(0.1)


def all_at_once(app: App, command: str, url: str, version: str) -> str:
    """The command on every api host at the same moment; wait until every api answers healthy
    on ``version`` and nginx answers again; say how long each took."""
    started = time.monotonic()
    on_all_apis(app, command)
    wait_healthy(app, version)
    healthy_after = time.monotonic() - started
    wait_answering(url)
    return (f"every api healthy again {healthy_after:.1f} s after the command started, "
            f"nginx answering again after {time.monotonic() - started:.1f} s")


def on_all_apis(app: App, command: str) -> None:
    """Run a command on every api host at the same moment (one thread each)."""
    errors: list[str] = []

    def run(name: str) -> None:
        code, out = app.hosts[name].exec(command)
        if code:
            errors.append(f"{name}: {out[-300:]}")

    threads = [threading.Thread(target=run, args=(name,)) for name in APIS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise SystemExit(f"`{command}` failed: {'; '.join(errors)}")


def seed_files(app: App, version: str) -> None:
    """The release's compose file and environment on each api host (rendered by difyops for
    that release), with MIGRATION_ENABLED=true as the seed's environment has it."""
    from tasks.core.inventory import load_inventory
    from tasks.core.render import Renderer
    from tasks.tiers import app as app_tier
    from tasks.tiers.app_release import with_release

    os.environ["DIFY_SECRETS"] = app.env["DIFY_SECRETS"]  # the lab's secrets, for rendering
    inventory = with_release(load_inventory(app.inventory_file), version)
    renderer = Renderer(inventory)
    for name in APIS:
        host = inventory.host(name)
        env = renderer.render("config/env/dify.env.j2", host).replace(
            "MIGRATION_ENABLED=false", "MIGRATION_ENABLED=true")
        files = {f"{DEPLOY}/compose.yml": app_tier.compose_file(inventory, renderer, host),
                 f"{DEPLOY}/.env": env}
        for path, text in files.items():
            data = base64.b64encode(text.encode()).decode()
            code, out = app.hosts[name].exec(f"echo {data} | base64 -d > {path}")
            if code:
                raise SystemExit(f"cannot write {path} on {name}: {out}")


def standin_lab(lab: Lab, scratch: Path) -> tuple[App, str, str]:
    """The app tier's lab with stand-in images, its releases shipped: (app, old, new)."""
    print("starting the lab: PostgreSQL, Redis, nginx, 2 api hosts, 1 worker/web host",
          flush=True)
    app = start_app(lab, scratch)
    return app, A, B


def real_lab_(lab: Lab, scratch: Path) -> tuple[App, str, str]:
    """The real-Dify lab, its api images built from the releases' source: (app, old, new)."""
    picked = real_lab.pick_releases(scratch / "source")
    if len(picked) < 2:
        raise SystemExit(f"no runnable release before {picked[0][0]} to upgrade from")
    print(f"building (or finding) the real api images of {picked[1][0]} and {picked[0][0]}",
          flush=True)
    new, old = (real_lab.ensure_release(lab, version, root) for version, root in picked)
    print("starting the lab: PostgreSQL primary + standby, Redis + Sentinel x3, nginx, "
          "2 api hosts (one with worker, beat, web, plugin daemon)", flush=True)
    return real_lab.start_real(lab, scratch, old.version), old.version, new.version


def back_to(app: App, old: str, upgraded: list[tuple[float, str]], images: str) -> None:
    """Back to the old release after the upgrade: with stand-ins, the schema as a restore would
    leave it; with the real images, the restore of the backup the upgrade took. Then
    `inv app.rollback`."""
    if images == "real":
        taken = next((m.group(1) for _, line in upgraded
                      if (m := re.search(r"\[app\] backup (\S+) taken", line))), "")
        if not taken:
            raise SystemExit("the upgrade printed no backup id")
        print(f"    back to {old}: inv backup.restore {taken}, inv app.rollback", flush=True)
        app.ok("backup.restore", taken)
    else:
        print(f"    back to {old} (schema as a restore leaves it, inv app.rollback)", flush=True)
        app.sql(f"UPDATE alembic_version SET version_num = '{standin.head(old)}'")
    app.ok("app.rollback")
    wait_healthy(app, old)


LABS = {"standin": standin_lab, "real": real_lab_}


def main() -> None:
    """Start the lab, deploy the old release, run the three operations under load, print the
    figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", choices=sorted(LABS), default="standin",
                        help="stand-in Dify images, or the real api built from source")
    parser.add_argument("--rate", type=float, default=20, help="requests per second, in all")
    parser.add_argument("--threads", type=int, default=4, help="client threads")
    parser.add_argument("--tail", type=float, default=5,
                        help="seconds of load kept after each operation")
    parser.add_argument("--baseline", type=float, default=10,
                        help="seconds of load with no change first, for reference")
    args = parser.parse_args()
    compose = f"docker compose --project-directory {DEPLOY} -p dify"
    results: dict[str, dict[str, float]] = {}
    notes: dict[str, str] = {}
    failures: dict[str, list[tuple[float, str]]] = {}
    with Lab() as lab, tempfile.TemporaryDirectory(prefix="difyops-bench-") as scratch:
        app, old, new = LABS[args.images](lab, Path(scratch))
        app.ok("images.sync", "--version", old)
        app.ok("images.sync", "--version", new)
        app.ok("app.deploy")
        url = f"{app.balancer}/console/api/setup"
        load = lambda: SteadyLoad(url, rate=args.rate, threads=args.threads)  # noqa: E731

        print(f"0/3 the same load for {args.baseline:g} s, no change (the reference)",
              flush=True)
        with load() as idle:
            time.sleep(args.baseline)
        results["no change"] = idle.figures()
        failures["no change"] = idle.errors

        print(f"1/3 inv app.upgrade --version {new} under load", flush=True)
        with load() as ours:
            started = time.monotonic()
            steps = timed_inv(app, ours.started, "app.upgrade", "--version", new)
            notes["difyops app.upgrade"] = f"the upgrade took {time.monotonic() - started:.1f} s"
            time.sleep(args.tail)
        results["difyops app.upgrade"] = ours.figures()
        failures["difyops app.upgrade"] = ours.errors

        back_to(app, old, steps, args.images)

        print(f"2/3 the seed's upgrade: compose up -d of {new} on both api hosts at once",
              flush=True)
        seed_files(app, new)
        with load() as seed:
            notes["seed's upgrade"] = all_at_once(app, f"{compose} up -d --no-deps api", url,
                                                   new)
            time.sleep(args.tail)
        results["seed's upgrade"] = seed.figures()
        failures["seed's upgrade"] = seed.errors

        print("3/3 docker compose restart api on both api hosts at once", flush=True)
        with load() as restart:
            notes["compose restart"] = all_at_once(app, f"{compose} restart api", url, new)
            time.sleep(args.tail)
        results["compose restart"] = restart.figures()
        failures["compose restart"] = restart.errors

    print(f"\nGET /console/api/setup through nginx, {args.rate:g} requests/s from "
          f"{args.threads} threads; 2 api hosts; {old} -> {new} ({args.images} images)")
    show(results)
    for key, note in notes.items():
        print(f"  {key}: {note}")
    for key, errors in failures.items():
        kinds: dict[str, int] = {}
        for _, why in errors:
            kind = why.split(" ")[0] + (" " + why.split(" ")[1] if why.startswith("HTTP") else "")
            kinds[kind] = kinds.get(kind, 0) + 1
        if errors:
            print(f"  {key} failures: " + ", ".join(f"{n} x {k}" for k, n in kinds.items())
                  + f"; first: {errors[0][1]} at {errors[0][0]:.1f} s")
        if key == "difyops app.upgrade":
            for at, why in errors[:10]:  # each with the upgrade's last line before it
                line = next((text for t, text in reversed(steps) if t <= at), "(before)")
                print(f"    {at:6.1f} s {why}\n             after: {line}")
    ours, theirs = results["difyops app.upgrade"], results["seed's upgrade"]
    print(f"\nfailed requests: difyops {ours['failed']:g}, seed's upgrade {theirs['failed']:g} "
          f"({ratio(theirs['failed'], ours['failed'])}); p99: difyops {ours['p99']:.0f} ms, "
          f"seed's upgrade {theirs['p99']:.0f} ms ({ratio(theirs['p99'], ours['p99'])})")


def ratio(theirs: float, ours: float) -> str:
    """theirs / ours, readable when ours is zero."""
    if ours == 0:
        return "difyops none" if theirs else "both none"
    return f"x{theirs / ours:.1f}"


def show(results: dict[str, dict[str, float]]) -> None:
    """The figures, one column per run."""
    names = list(results)
    width = max(len(n) for n in names)
    rows = [("requests sent", "sent", "{:.0f}"), ("requests failed", "failed", "{:.0f}"),
            ("failed %", None, "{:.1f}"), ("p50 latency ms", "p50", "{:.1f}"),
            ("p99 latency ms", "p99", "{:.1f}"), ("seconds loaded", "seconds", "{:.1f}")]
    print(f"{'':16}" + "".join(f"  {n:>{width}}" for n in names))
    for label, key, fmt in rows:
        cells = []
        for name in names:
            figures = results[name]
            value = (100 * figures["failed"] / figures["sent"] if figures["sent"] else 0) \
                if key is None else figures[key]
            cells.append(f"  {fmt.format(value):>{width}}")
        print(f"{label:16}" + "".join(cells))


if __name__ == "__main__":
    main()
