"""Images: get a Dify release's images onto the hosts that run them, registry or not.

On the control machine (where `inv` runs), each image is pulled from upstream (behind
dify.registry_mirror) unless it is there already (or --refresh). Then, with dify.private_registry
set, each is tagged with the registry's name and pushed there: hosts pull it when they deploy.
Without one, each host that lacks an image, or holds another image under its name, gets it over
SSH: `docker save` here streamed into `docker load` there, all its missing images in one stream
(layers shared by images travel once). Image IDs are compared, so a second sync ships nothing.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterable
from dataclasses import dataclass

from tasks.core import shell
from tasks.core.errors import DifyopsError
from tasks.core.fleet import each_host
from tasks.core.hosts import Machine
from tasks.core.inventory import APP_ROLES, Host, Inventory
from tasks.tiers import app as app_tier
from tasks.tiers import logging as logging_tier

PRESENT, SHIPPED, PULLED, PUSHED, LOCAL = "present", "shipped", "pulled", "pushed", "local"


class ImageError(DifyopsError):
    """An image could not be pulled, pushed or shipped (rows: what did happen)."""

    def __init__(self, message: str, rows: Iterable[Row] = ()) -> None:
        super().__init__(message)
        self.rows = list(rows)


@dataclass(frozen=True)
class Row:
    """What happened to one image at one place (a host, or the control machine)."""

    where: str
    image: str
    status: str
    detail: str = ""


def host_images(inventory: Inventory, host: Host) -> list[str]:
    """The images a host runs, as its compose files name them (app components, Weaviate, the
    log store)."""
    images = set(app_tier.host_images(inventory, host).values()) if host.has(*APP_ROLES) \
        else set()
    vector = inventory.settings.vector
    if host.has("vector") and vector.store == "weaviate":
        images.add(weaviate(inventory, inventory.image))
    if host.has("logging"):
        images.update(logging_tier.images(inventory).values())
    return sorted(images)


def weaviate(inventory: Inventory, naming) -> str:
    """Weaviate's image as the vector tier names it (a pinned version overrides the profile)."""
    version = inventory.settings.vector.weaviate_version
    if not version:
        return naming("weaviate")
    return inventory.settings.dify.registry_mirror + f"semitechnologies/weaviate:{version}"


def upstream(inventory: Inventory) -> dict[str, str]:
    """image as hosts name it -> image as pulled from upstream, for every host's images."""
    names: dict[str, str] = {}
    components = {c for host in inventory.with_role(*APP_ROLES)
                  for c in app_tier.host_images(inventory, host)}
    for component in components:
        names[inventory.image(component)] = inventory.upstream_image(component)
    if inventory.with_role("vector") and inventory.settings.vector.store == "weaviate":
        names[weaviate(inventory, inventory.image)] = weaviate(inventory,
                                                               inventory.upstream_image)
    if inventory.with_role("logging"):
        names.update(zip(logging_tier.images(inventory).values(),
                         logging_tier.upstream_images(inventory).values(), strict=True))
    return names


class ControlDocker:
    """The Docker engine of the control machine, through the docker command line."""

    def __init__(self, timeout: float = 1800) -> None:
        self.timeout = timeout

    def run(self, *args: str) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(["docker", *args], capture_output=True, text=True,
                                  timeout=self.timeout, check=False)
        except FileNotFoundError as exc:
            raise ImageError("docker is not installed on the control machine: images.sync "
                             "pulls images here first (run scripts/setup)") from exc

    def image_id(self, name: str) -> str | None:
        result = self.run("image", "inspect", "-f", "{{.Id}}", name)
        return result.stdout.strip() if result.returncode == 0 else None

    def pushed(self, name: str) -> bool:
        """Whether this engine pushed (or pulled) the image under this name already."""
        result = self.run("image", "inspect", "-f", "{{json .RepoDigests}}", name)
        repository = name.rsplit(":", 1)[0] if ":" in name.rsplit("/", 1)[-1] else name
        return result.returncode == 0 and f'"{repository}@sha256:' in result.stdout

    def check(self, *args: str) -> None:
        result = self.run(*args)
        if result.returncode != 0:
            lines = (result.stderr.strip() or result.stdout.strip()).splitlines()
            raise ImageError(f"`docker {' '.join(args)}` failed on the control machine: "
                             f"{lines[-1] if lines else f'exit {result.returncode}'}")

    def save(self, names: Iterable[str]) -> subprocess.Popen:
        return subprocess.Popen(["docker", "save", *names], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)


def prepare(inventory: Inventory, docker: ControlDocker, refresh: bool) -> list[Row]:
    """Pull what the control machine lacks (or everything with refresh); push to the private
    registry when there is one."""
    rows: list[Row] = []
    registry = inventory.settings.dify.private_registry
    for name, source in sorted(upstream(inventory).items()):
        if refresh or docker.image_id(source) is None:
            docker.check("pull", "-q", source)
            rows.append(Row("control", source, PULLED))
        else:
            rows.append(Row("control", source, PRESENT))
        if registry:
            if docker.image_id(name) != docker.image_id(source):
                docker.check("tag", source, name)
            if refresh or not docker.pushed(name):
                docker.check("push", "-q", name)
                rows.append(Row(registry, name, PUSHED))
            else:
                rows.append(Row(registry, name, PRESENT, "pushed before"))
    return rows


def host_ids(machine: Machine, images: list[str]) -> dict[str, str | None]:
    """image -> its ID in the host's engine (None: absent)."""
    script = "; ".join(f"docker image inspect -f '{{{{.Id}}}}' {shell.quote(i)} 2>/dev/null "
                       f"|| echo -" for i in images)
    result = machine.run(script)
    if not result.ok:
        raise ImageError(f"{machine.host.target}: cannot list its images: {result.answer}")
    answers = result.stdout.split()
    if len(answers) != len(images):
        raise ImageError(f"{machine.host.target}: docker answered {result.stdout!r}")
    return {image: None if answer == "-" else answer for image, answer in zip(images, answers,
                                                                               strict=True)}


def ship(inventory: Inventory, docker: ControlDocker, host: Host, machine: Machine,
         refresh: bool) -> list[Row]:
    """docker save | docker load of the images the host lacks (or holds in another version)."""
    images = host_images(inventory, host)
    if host.connection == "local":
        return [Row(host.name, image, LOCAL, "the control machine's own engine")
                for image in images]
    wanted = {image: docker.image_id(image) for image in images}
    present = host_ids(machine, images)
    missing = [i for i in images if refresh or present[i] != wanted[i]]
    if missing:
        saver = docker.save(missing)
        try:
            result = machine.feed("docker load -q", saver.stdout)
        finally:
            saver.stdout.close()
            error = saver.stderr.read().decode(errors="replace").strip()
            saver.wait()
        if saver.returncode != 0:
            raise ImageError(f"docker save failed on the control machine: {error}")
        if not result.ok:
            raise ImageError(f"{host.target}: docker load failed: {result.answer}")
        loaded = host_ids(machine, missing)
        wrong = [i for i in missing if loaded[i] != wanted[i]]
        if wrong:
            raise ImageError(f"{host.target}: after docker load, {', '.join(wrong)} still "
                             f"differ from the control machine's")
    return [Row(host.name, image, SHIPPED if image in missing else PRESENT) for image in images]


def sync(inventory: Inventory, refresh: bool = False, parallel: int = 4) -> list[Row]:
    """Every image of the inventory's release where its hosts need it (module doc)."""
    docker = ControlDocker(inventory.settings.timeouts.command)
    rows = prepare(inventory, docker, refresh)
    if inventory.settings.dify.private_registry:
        return rows
    hosts = [h for h in inventory.hosts if host_images(inventory, h)]
    outcomes = each_host(hosts, lambda m: ship(inventory, docker, m.host, m, refresh),
                         inventory.settings.timeouts, parallel=parallel)
    errors = []
    for outcome in outcomes:
        if outcome.ok:
            rows.extend(outcome.value or [])
        else:
            errors.append(outcome.error)
            rows.append(Row(outcome.host.name, "-", "failed", outcome.error))
    if errors:
        raise ImageError(f"images did not reach {len(errors)} host(s):\n  "
                         + "\n  ".join(errors) + "\n  the others have them; rerun "
                         "inv images.sync once the cause is fixed (it ships only what is "
                         "missing)", rows)
    return rows
