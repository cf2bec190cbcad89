"""dev: the home-lab development layout (home server, backend VM, front-end workstation)."""

from __future__ import annotations

from invoke import Context, task
from invoke.exceptions import Exit

from tasks.core.cli import DIFF_HELP, DRY_HELP, load, reported, run_tiers
from tasks.core.fleet import table
from tasks.core.inventory import Inventory, endpoint
from tasks.core.project import display
from tasks.tiers import TIERS, dev_backend, dev_frontend
from tasks.tiers.dev_common import check, server_tiers


def connection_rows(inventory: Inventory, show_secrets: bool) -> list[tuple[str, str, str]]:
    """(service, where, credentials) for every base service the development machines use."""
    settings, where = inventory.settings, display(inventory.secrets_file)

    def secret(name: str) -> str:
        return inventory.secrets[name] if show_secrets else f"{name} in {where}"

    primary = inventory.with_role("db_primary")[0]
    cache = inventory.with_role("cache")[0]
    rows = [
        ("PostgreSQL", endpoint(primary.address, settings.db.port),
         f"user dify, database dify, password {secret('DB_PASSWORD')}; a plugin daemon: user "
         f"dify_plugin, database dify_plugin, password {secret('DB_PLUGIN_PASSWORD')}"),
        ("Redis", endpoint(cache.address, settings.cache.port),
         f"password {secret('REDIS_PASSWORD')}"),
    ]
    if settings.vector.store == "weaviate":
        vector = inventory.with_role("vector")[0]
        rows.append(("Weaviate", f"http://{endpoint(vector.address, 8080)} "
                                   f"(gRPC {endpoint(vector.address, 50051)})",
                     f"API key {secret('WEAVIATE_API_KEY')}"))
    for backend in inventory.with_role("dev_backend"):
        rows.append(("Dify api (dev)", f"http://{endpoint(backend.address, 5001)}",
                     f"on {backend.name}"))
    for frontend in inventory.with_role("dev_frontend"):
        rows.append(("Dify web (dev)", f"http://{endpoint(frontend.address, 3000)}",
                     f"on {frontend.name}"))
    return rows


@task(help={"secrets": "also print the passwords and keys (they are hidden by default)"})
@reported
def info(ctx: Context, secrets: bool = False) -> None:
    """Print what the development machines need to reach the home server's base services."""
    inventory = load(ctx)
    if not inventory.with_role("dev_backend", "dev_frontend"):
        raise Exit(f"error: {display(inventory.file)} has no dev_backend or dev_frontend host: "
                   f"dev.info is for a home-lab inventory such as "
                   f"config/inventories/homelab.yml", code=1)
    network = inventory.settings.dev.network
    print(f"home-lab {inventory.name}" + (f", reachable from {network}" if network else ""))
    print(table(["service", "address", "credentials"], connection_rows(inventory, secrets)))


def require(inventory: Inventory, role: str, task_name: str) -> None:
    """Stop with a message when no host of the inventory plays the role the task deploys."""
    if not inventory.with_role(role):
        raise Exit(f"error: {display(inventory.file)} has no host with role {role}: {task_name} "
                   f"is for a home-lab inventory such as config/inventories/homelab.yml", code=1)


@task(help={"dry": DRY_HELP, "diff": DIFF_HELP,
            "only": "comma-separated base tiers to deploy, e.g. db,cache (default: all of db, "
                    "cache, vector, monitor)"})
@reported
def server(ctx: Context, dry: bool = False, only: str = "", diff: bool = False) -> None:
    """Deploy the home server's base services (PostgreSQL, Redis, vector store, monitoring)."""
    inventory = load(ctx)
    require(inventory, "dev_server", "dev.server")
    check(inventory, server=True)
    run_tiers(ctx, server_tiers(TIERS), dry=dry, only=only, diff=diff)
    if not dry:
        print()
        info(ctx)


@task(help={"dry": DRY_HELP, "diff": DIFF_HELP})
@reported
def backend(ctx: Context, dry: bool = False, diff: bool = False) -> None:
    """Run Dify's api (flask --debug) and worker from a checkout on the development VM."""
    inventory = load(ctx)
    require(inventory, "dev_backend", "dev.backend")
    check(inventory)
    run_tiers(ctx, [dev_backend.TIER], dry=dry, diff=diff)


@task(help={"dry": DRY_HELP, "diff": DIFF_HELP})
@reported
def frontend(ctx: Context, dry: bool = False, diff: bool = False) -> None:
    """Run Dify's web dev server (pnpm dev) on the workstation (Linux or Windows)."""
    inventory = load(ctx)
    require(inventory, "dev_frontend", "dev.frontend")
    check(inventory)
    run_tiers(ctx, [dev_frontend.TIER], dry=dry, diff=diff)
