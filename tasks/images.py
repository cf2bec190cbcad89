"""images: get the images of a Dify release onto its hosts (private registry, or SSH)."""

from __future__ import annotations

from invoke import Context, task

from tasks.core.cli import load, reported
from tasks.core.fleet import table
from tasks.tiers.app_release import with_release
from tasks.tiers.images import ImageError, Row, sync


def show(rows: list[Row]) -> None:
    """Print what happened to each image, where."""
    print(table(["where", "image", "status", "detail"],
                [(r.where, r.image, r.status, r.detail) for r in rows]))


@task(name="sync", help={
    "version": "the Dify version whose images to sync (default: the inventory's dify.version)",
    "refresh": "pull on the control machine and ship/push again even where images are present"})
@reported
def sync_(ctx: Context, version: str = "", refresh: bool = False) -> None:
    """Pull a release's images here; push them to the private registry or ship them over SSH."""
    inventory = load(ctx)
    if version:
        inventory = with_release(inventory, version)
    where = inventory.settings.dify.private_registry or "each host over SSH"
    print(f"images of Dify {inventory.profile.version} -> {where}", flush=True)
    try:
        rows = sync(inventory, refresh=refresh)
    except ImageError as exc:
        show(exc.rows)
        raise
    show(rows)
    moved = [r for r in rows if r.status in ("shipped", "pushed", "pulled")]
    print(f"{len(moved)} image transfer(s); " + ("nothing to do: every host has every image"
                                                 if not moved else "done"))
