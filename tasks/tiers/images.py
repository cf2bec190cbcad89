"""Images: get a Dify release's images onto the hosts that run them, registry or not.

On the control machine (where `inv` runs), each image is pulled from upstream (behind
dify.registry_mirror) unless it is there already (or --refresh). Then, with dify.private_registry
set, each is tagged with the registry's name and pushed there: hosts pull it when they deploy.
Without one, each host that lacks an image, or holds another image under its name, gets it over
SSH: `docker save` here streamed into `docker load` there, all its missing images in one stream
(layers shared by images travel once); hosts that lack the same images share one `docker save`,
so the control machine packs them once. Image IDs are compared, so a second sync ships nothing.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import BinaryIO

from tasks.core import shell
from tasks.core.errors import DifyopsError
from tasks.core.fleet import Outcome, each_host
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


def lacking(inventory: Inventory, wanted: dict[str, str | None], machine: Machine,
            refresh: bool) -> list[str]:
    """The host's images it lacks or holds in another version (all of them with refresh)."""
    images = host_images(inventory, machine.host)
    present = host_ids(machine, images)
    return [i for i in images if refresh or present[i] != wanted[i]]


def receive(machine: Machine, stream: BinaryIO, images: list[str],
            wanted: dict[str, str | None]) -> None:
    """docker load on the host from the stream, then its image IDs checked; the stream is
    closed at the end, so the sender stops writing to a host that gave up."""
    host = machine.host
    try:
        result = machine.feed("docker load -q", stream)
    finally:
        stream.close()
    if not result.ok:
        raise ImageError(f"{host.target}: docker load failed: {result.answer}")
    loaded = host_ids(machine, images)
    wrong = [i for i in images if loaded[i] != wanted[i]]
    if wrong:
        raise ImageError(f"{host.target}: after docker load, {', '.join(wrong)} still "
                         f"differ from the control machine's")


def tee(source: BinaryIO, sinks: list[BinaryIO]) -> None:
    """Copy source to every sink until its end, a chunk at a time (the slowest sink sets the
    pace); a sink that fails (its host gave up) is dropped and the others go on. Every sink is
    closed at the end."""
    open_sinks = list(sinks)
    try:
        while open_sinks and (chunk := source.read(1 << 20)):
            for sink in list(open_sinks):
                try:
                    sink.write(chunk)
                    sink.flush()
                except OSError:
                    open_sinks.remove(sink)
                    close_quietly(sink)
    finally:
        for sink in open_sinks:
            close_quietly(sink)


def close_quietly(stream: BinaryIO) -> None:
    """Close a pipe's end whose reader may be gone already."""
    with contextlib.suppress(OSError):
        stream.close()


def ship(docker: ControlDocker, images: list[str], hosts: list[Host],
         wanted: dict[str, str | None], timeouts: Mapping[str, int]) -> list[Outcome[None]]:
    """One `docker save` of the images, streamed to `docker load` on every host at once: the
    control machine reads and packs the images once, whatever the number of hosts."""
    pipes = {host.name: os.pipe() for host in hosts}
    readers = {name: os.fdopen(read, "rb") for name, (read, _) in pipes.items()}
    writers = [os.fdopen(write, "wb") for _, write in pipes.values()]
    saver = docker.save(images)
    pump = threading.Thread(target=tee, args=(saver.stdout, writers), daemon=True)
    pump.start()
    try:
        outcomes = each_host(hosts, lambda m: receive(m, readers[m.host.name], images, wanted),
                             timeouts, parallel=len(hosts))
    finally:
        for reader in readers.values():  # a host that never started reading stops the copy
            close_quietly(reader)
        pump.join()
        saver.stdout.close()
        error = saver.stderr.read().decode(errors="replace").strip()
        saver.wait()
    if saver.returncode != 0 and any(outcome.ok for outcome in outcomes):
        raise ImageError(f"docker save failed on the control machine: {error}")
    return outcomes


def sync(inventory: Inventory, refresh: bool = False, parallel: int = 4) -> list[Row]:
    """Every image of the inventory's release where its hosts need it (module doc). Hosts that
    lack the same images get them from one `docker save`, `parallel` hosts at a time."""
    docker = ControlDocker(inventory.settings.timeouts.command)
    rows = prepare(inventory, docker, refresh)
    if inventory.settings.dify.private_registry:
        return rows
    timeouts = inventory.settings.timeouts
    hosts = [h for h in inventory.hosts if host_images(inventory, h)]
    rows += [Row(h.name, image, LOCAL, "the control machine's own engine")
             for h in hosts if h.connection == "local" for image in host_images(inventory, h)]
    remote = [h for h in hosts if h.connection != "local"]
    wanted = {image: docker.image_id(image)
              for image in {i for h in remote for i in host_images(inventory, h)}}
    missing: dict[str, list[str]] = {}
    errors: list[str] = []
    failed: dict[str, str] = {}
    for outcome in each_host(remote, lambda m: lacking(inventory, wanted, m, refresh),
                             timeouts, parallel=parallel):
        if outcome.ok:
            missing[outcome.host.name] = outcome.value or []
        else:
            failed[outcome.host.name] = outcome.error
    groups: dict[tuple[str, ...], list[Host]] = {}
    for host in remote:
        if missing.get(host.name):
            groups.setdefault(tuple(missing[host.name]), []).append(host)
    for images, group in groups.items():
        for batch in (group[i:i + parallel] for i in range(0, len(group), parallel)):
            for outcome in ship(docker, list(images), batch, wanted, timeouts):
                if not outcome.ok:
                    failed[outcome.host.name] = outcome.error
    for host in remote:
        if host.name in failed:
            errors.append(failed[host.name])
            rows.append(Row(host.name, "-", "failed", failed[host.name]))
        else:
            rows += [Row(host.name, image, SHIPPED if image in missing[host.name] else PRESENT)
                     for image in host_images(inventory, host)]
    if errors:
        raise ImageError(f"images did not reach {len(errors)} host(s):\n  "
                         + "\n  ".join(errors) + "\n  the others have them; rerun "
                         "inv images.sync once the cause is fixed (it ships only what is "
                         "missing)", rows)
    return rows
