"""Build the stand-in Dify images the integration tests deploy (see dify-standin/standin.py).

One core image (``difyops-test/dify-standin:<hash of its inputs>``) holds the program; every image
a Dify version profile names gets a tag of its own that only adds ENV (role, version, migration
chain), named as the profile names it behind a registry-mirror prefix, e.g.
``difyops-standin/langgenius/dify-api:1.13.3``. An inventory with
``dify.registry_mirror: difyops-standin/`` then deploys them with the real tasks. Tags are rebuilt
only when their inputs change (a label on each holds the hash).

broken_api() builds a faulty variant of a version's api image for failure tests: the same
release with its PostgreSQL driver left out of the build, so its /health never answers "ok".

RELEASES gives each version's migration chain (its last revision is the api image's head, which
`flask db heads` prints) and whether its entrypoint knows MODE=migration.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import docker
import docker.errors

from tasks.core.profiles import load_profile

HERE = Path(__file__).resolve().parent
CONTEXT = HERE / "dify-standin"
CORE_REPO = "difyops-test/dify-standin"
BROKEN_REPO = "difyops-test/dify-api-broken"
PREFIX = "difyops-standin/"
LABEL = "difyops.standin.inputs"
# Revisions are alembic-like ids; a later release carries every earlier revision plus its own.
RELEASES: dict[str, dict] = {
    "1.5.1": {"revisions": ["5e2a1c0b0151"], "migration_mode": False},
    "1.13.3": {"revisions": ["5e2a1c0b0151", "7f3b2d1c1133"], "migration_mode": True},
    "1.16.1": {"revisions": ["5e2a1c0b0151", "7f3b2d1c1133", "9c1d4e2f1161"],
               "migration_mode": True},
}
# Components with an image of their own; a release's profile decides which it has
# (agent_ssrf_proxy runs the squid image of ssrf_proxy).
ROLES = ("api", "web", "plugin_daemon", "sandbox", "ssrf_proxy", "agent_backend", "local_sandbox")


def digest(*parts: str | bytes) -> str:
    """A short sha256 of the inputs."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "big") + data)
    return h.hexdigest()[:16]


def head(version: str) -> str:
    """The alembic head of the stand-in api image of a Dify version."""
    return RELEASES[version]["revisions"][-1]


def image_name(version: str, component: str) -> str:
    """The stand-in's name for a component of a version (the profile's name behind PREFIX)."""
    return PREFIX + load_profile(version).images[component]


def mirror(client: docker.DockerClient, names: Iterable[str], prefix: str) -> None:
    """Tag stand-in images (names behind PREFIX) behind another registry-mirror prefix too, for
    a lab whose inventory mixes them with images of its own under names no other test owns."""
    for name in names:
        client.images.get(name).tag(*(prefix + name.removeprefix(PREFIX)).rsplit(":", 1))


def ensure_core(client: docker.DockerClient, base_image: str) -> str:
    """The core image, built from the base image once per set of inputs; returns its tag."""
    base_id = client.images.get(base_image).id
    files = sorted(p for p in CONTEXT.rglob("*") if p.is_file())
    inputs = digest(base_id, *(part for p in files for part in (p.name, p.read_bytes())))
    tag = f"{CORE_REPO}:{inputs}"
    try:
        client.images.get(tag)
        return tag
    except docker.errors.ImageNotFound:
        pass
    with tempfile.TemporaryDirectory(prefix="difyops-standin-") as scratch:
        shutil.copytree(CONTEXT, scratch, dirs_exist_ok=True)
        build_folder(scratch, tag, {"BASE_IMAGE": base_id}, timeout=900)
    return tag


def build_folder(folder: str, tag: str, buildargs: dict[str, str], *,
                 labels: dict[str, str] | None = None, timeout: int,
                 cpu_shares: int | None = None) -> None:
    """`docker build` of a folder, never pulling; a failure names the tag and ends with the
    build log's tail. ``cpu_shares``: the build's CPU weight against other containers (1024
    each by default), which only counts while the CPU is short."""
    builder = docker.from_env(timeout=timeout)
    limits = {"cpushares": cpu_shares} if cpu_shares else None
    try:
        builder.images.build(path=folder, tag=tag, buildargs=buildargs, labels=labels or {},
                             rm=True, forcerm=True, pull=False, container_limits=limits)
    except docker.errors.BuildError as exc:
        log = "".join(str(item.get("stream", item.get("error", ""))) for item in exc.build_log)
        raise RuntimeError(f"building {tag} failed: {exc}\n{log[-6000:]}") from exc
    finally:
        builder.close()


def role_dockerfile(core: str, role: str, version: str, release: dict | None) -> str:
    """The few lines that turn the core into one component's image."""
    env = f"ENV STANDIN_ROLE={role} STANDIN_VERSION={version}"
    if release:
        env += (f" STANDIN_REVISIONS=\"{' '.join(release['revisions'])}\""
                f" STANDIN_MIGRATION_MODE={1 if release['migration_mode'] else 0}")
    lines = [f"FROM {core}", env]
    if role == "api":
        lines.append("USER 1001")  # Dify's api image runs as uid 1001: storage must be its own
    return "\n".join(lines) + "\n"


def ensure_images(client: docker.DockerClient, base_image: str,
                  versions: tuple[str, ...] = tuple(RELEASES),
                  roles: tuple[str, ...] = ROLES) -> dict[str, dict[str, str]]:
    """Every stand-in image of the versions (of the given roles only: without "api", a version
    needs no stand-in release of its own); returns {version: {component: image name}}."""
    core = ensure_core(client, base_image)
    names: dict[str, dict[str, str]] = {}
    for version in versions:
        release = RELEASES[version] if "api" in roles else None
        names[version] = {}
        for role in roles:
            if role not in load_profile(version).images:
                continue
            name = image_name(version, role)
            if role == "api":
                text = role_dockerfile(core, role, version, release)
            else:  # versioned by their own tag; sandbox and squid are shared by releases
                text = role_dockerfile(core, role, name.rsplit(":", 1)[-1], None)
            wanted = digest(core, text)
            names[version][role] = name
            try:
                if client.images.get(name).labels.get(LABEL) == wanted:
                    continue
            except docker.errors.ImageNotFound:
                pass
            text += f"LABEL {LABEL}={wanted}\n"
            client.images.build(fileobj=io.BytesIO(text.encode()), tag=name, rm=True,
                                pull=False)
    return names


def broken_api(client: docker.DockerClient, base_image: str, version: str) -> str:
    """A broken build of a version's api image: python3-psycopg2 left out (as when a dependency
    drops out of an image build). It starts and serves, its one-off commands that need no
    database work, but /health answers 503 ("database: No module named 'psycopg2'") forever.
    Tagged difyops-test/dify-api-broken:<version> here; a test puts it on one host under the
    profile's name. Returns the tag."""
    good = ensure_images(client, base_image, (version,))[version]["api"]
    text = (f"FROM {good}\nUSER root\n"
            "RUN rm -rf /usr/lib/python3/dist-packages/psycopg2*\nUSER 1001\n")
    wanted = digest(client.images.get(good).id, text)
    tag = f"{BROKEN_REPO}:{version}"
    try:
        if client.images.get(tag).labels.get(LABEL) == wanted:
            return tag
    except docker.errors.ImageNotFound:
        pass
    client.images.build(fileobj=io.BytesIO((text + f"LABEL {LABEL}={wanted}\n").encode()),
                        tag=tag, rm=True, pull=False)
    return tag
