"""difyops: the engine's package and the `inv` entry point.

One module per `inv` namespace (tasks/db.py is `inv db.*`, thin); the engine in tasks/core;
what each tier deploys and operates in tasks/tiers; backups in tasks/backups. Invoke reads the
root namespace ``ns`` of this package; it is built on first use, so that importing the engine
(``import tasks.core.inventory``) does not import every task module.
"""

from __future__ import annotations

from invoke import Collection


def namespace() -> Collection:
    """The root namespace: every task module's collection under its own name."""
    from tasks import (
        app,
        backup,
        cache,
        config,
        db,
        deploy,
        dev,
        hosts,
        images,
        lb,
        logs,
        monitor,
        net,
        vector,
    )

    root = Collection()
    for module in (config, db, cache, vector, app, images, lb, monitor, backup, dev, deploy,
                   net, hosts):
        root.add_collection(Collection.from_module(module))
    root.add_collection(Collection.from_module(logs, name="logging"))  # (a file avoids that name)
    _long_flags_only(root)
    return root


def _long_flags_only(collection: Collection) -> None:
    """Every flag long only: Invoke's automatic short flags take first letters in turn, so
    `--parallel` became `-a` because `--preflight` held `-p`."""
    for task in collection.tasks.values():
        task.auto_shortflags = False
    for child in collection.collections.values():
        _long_flags_only(child)


def __getattr__(name: str) -> Collection:
    """``ns`` (Invoke's root namespace), built once on first use."""
    if name != "ns":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    built = globals()["ns"] = namespace()
    return built
