"""The `inv` entry point: the root namespace of difyops, built from the modules in tasks/.

Invoke imports this file as the module `tasks`, which would hide the tasks/ folder. Giving the
module a `__path__` makes it a package whose submodules live in tasks/, so `import tasks.db`
works the same under `inv`, pytest and GitHub Actions.
"""

from pathlib import Path

__path__ = [str(Path(__file__).resolve().parent / "tasks")]

from invoke import Collection

from tasks import app, backup, cache, config, db, deploy, dev, images, lb, monitor, net, vector
from tasks import hosts as host_tasks  # the namespace `hosts` (not the engine's tasks.core.hosts)
from tasks import logs as logging_tasks  # the namespace `logging` (the file avoids that name)

ns = Collection()
for module in (config, db, cache, vector, app, images, lb, monitor, backup, dev, deploy, net,
               host_tasks):
    ns.add_collection(Collection.from_module(module))
ns.add_collection(Collection.from_module(logging_tasks, name="logging"))
