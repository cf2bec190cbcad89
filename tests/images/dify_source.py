"""Dify's own source of a release, for the tests that build and run the real Dify.

Where the source comes from: ``DIFYOPS_DIFY_SOURCE`` (a Dify checkout, or a tarball of one, e.g.
``git archive --prefix=dify-<v>/ <tag> api docker``) when set; else the release tarball
``dify-<version>.tar.gz`` in ``../shared/dify`` beside the repository. Nothing of it is ever
copied into this repository: it is unpacked into a temporary folder when a test needs it.

Facts about a release are read from its files by code: the worker's default queue list from
``api/docker/entrypoint.sh``, the production image's environment and its ``uv sync`` command
from ``api/Dockerfile``, the version from ``api/pyproject.toml``. An image of another folder of
the release with its own Dockerfile and pyproject.toml (1.16.1's ``dify-agent/``) is read the
same way: the functions that read those files take the folder (``api`` unless told).
"""

from __future__ import annotations

import hashlib
import os
import re
import tarfile
import tomllib
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED = REPO_ROOT.parent / "shared" / "dify"
SOURCE_ENV = "DIFYOPS_DIFY_SOURCE"


class Unavailable(Exception):
    """What the tests need of a release is not on this machine (the message says what)."""


def source_for(version: str) -> Path:
    """The checkout or tarball of Dify ``version`` (see the module doc); Unavailable if none."""
    named = os.environ.get(SOURCE_ENV, "").strip()
    if named:
        path = Path(named).expanduser()
        if not path.exists():
            raise Unavailable(f"{SOURCE_ENV}={named} does not exist")
        return path
    tarball = SHARED / f"dify-{version}.tar.gz"
    if not tarball.is_file():
        raise Unavailable(f"no source of Dify {version}: neither {SOURCE_ENV} (a Dify checkout "
                          f"or tarball) nor ../shared/dify/dify-{version}.tar.gz beside the "
                          "repository")
    return tarball


def _safe_members(archive: tarfile.TarFile) -> list[tarfile.TarInfo]:
    """The archive's members, refusing absolute paths and '..' (a tarball is input)."""
    members = archive.getmembers()
    for member in members:
        if member.name.startswith("/") or ".." in Path(member.name).parts:
            raise Unavailable(f"unsafe path in the Dify tarball: {member.name}")
    return members


def unpack(source: Path, into: Path) -> Path:
    """The release root (the folder that holds ``api/``) of a checkout, or of a tarball
    unpacked into ``into``."""
    if source.is_dir():
        root = source
    else:
        with tarfile.open(source) as archive:
            archive.extractall(into, members=_safe_members(archive), filter="tar")
        candidates = [into, *sorted(p for p in into.iterdir() if p.is_dir())]
        root = next((p for p in candidates if (p / "api" / "pyproject.toml").is_file()), into)
    if not (root / "api" / "Dockerfile").is_file():
        raise Unavailable(f"{source} holds no Dify api/ folder with its Dockerfile")
    return root


def digest_of(source: Path, folder: str = "api") -> str:
    """A sha256 of the source: the tarball's bytes, or every file under a checkout's
    ``folder``."""
    h = hashlib.sha256()
    if source.is_file():
        with source.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()
    top = source / folder
    for path in sorted(p for p in top.rglob("*") if p.is_file() and ".venv" not in p.parts):
        h.update(str(path.relative_to(top)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def version_of(root: Path, folder: str = "api") -> str:
    """The release's version, from ``<folder>/pyproject.toml``."""
    data = tomllib.loads((root / folder / "pyproject.toml").read_text(encoding="utf-8"))
    return str(data["project"]["version"])


def worker_queues(root: Path, edition: str = "SELF_HOSTED") -> list[str]:
    """The queues a worker of this release consumes when nothing overrides them: the
    ``DEFAULT_QUEUES`` of ``api/docker/entrypoint.sh`` for ``edition`` (CLOUD or not)."""
    text = (root / "api" / "docker" / "entrypoint.sh").read_text(encoding="utf-8")
    found = re.findall(r'^\s*DEFAULT_QUEUES="([^"$]+)"', text, flags=re.MULTILINE)
    if len(found) < 2:
        raise Unavailable("api/docker/entrypoint.sh: no CLOUD/SELF_HOSTED DEFAULT_QUEUES pair")
    # The entrypoint tests EDITION == CLOUD first, then the community (self-hosted) default.
    chosen = found[0] if edition == "CLOUD" else found[1]
    return chosen.split(",")


def _production_stage(dockerfile: str) -> str:
    """The text of the Dockerfile's last stage (Dify's production stage)."""
    stages = re.split(r"^FROM\s", dockerfile, flags=re.MULTILINE)
    return stages[-1]


def production_env(root: Path, folder: str = "api") -> dict[str, str]:
    """The ENV of the production image of ``<folder>/Dockerfile`` (``ENV K=V`` and ``ENV K V``
    lines of its last stage), without the ones that name paths of its build (``${...}``)."""
    stage = _production_stage((root / folder / "Dockerfile").read_text(encoding="utf-8"))
    env: dict[str, str] = {}
    for line in stage.replace("\\\n", " ").splitlines():
        match = re.match(r"^ENV\s+(.*)$", line.strip())
        if not match:
            continue
        body = match.group(1).strip()
        pairs = re.findall(r'(\w+)=("[^"]*"|\S+)', body) if "=" in body.split()[0] \
            else [tuple(body.split(None, 1))]
        for key, value in pairs:
            value = value.strip('"')
            if "$" not in value:
                env[key] = value
    return env


def uv_sync_command(root: Path, folder: str = "api") -> str:
    """The ``uv sync ...`` command ``<folder>/Dockerfile`` runs (e.g. ``--frozen --no-dev``)."""
    text = (root / folder / "Dockerfile").read_text(encoding="utf-8")
    match = re.search(r"^RUN\s+(uv sync[^\n\\&;]*)", text, flags=re.MULTILINE)
    return match.group(1).strip() if match else "uv sync --frozen --no-dev"


def uv_version(root: Path, folder: str = "api") -> str:
    """The uv version ``<folder>/Dockerfile`` installs (``ENV UV_VERSION=...``)."""
    text = (root / folder / "Dockerfile").read_text(encoding="utf-8")
    match = re.search(r"UV_VERSION=([0-9][\w.]*)", text)
    if not match:
        raise Unavailable(f"{folder}/Dockerfile names no UV_VERSION")
    return match.group(1)


def alembic_heads(root: Path) -> set[str]:
    """The heads of the release's migration scripts (``api/migrations/versions``): revisions
    that no other script names as its ``down_revision``."""
    revisions: set[str] = set()
    parents: set[str] = set()
    for script in (root / "api" / "migrations" / "versions").rglob("*.py"):
        text = script.read_text(encoding="utf-8")
        revision = re.search(r"^revision\s*(?::\s*str\s*)?=\s*['\"](\w+)['\"]", text,
                             flags=re.MULTILINE)
        down = re.search(r"^down_revision\s*(?::[^=]*)?=\s*(.+)$", text, flags=re.MULTILINE)
        if revision:
            revisions.add(revision.group(1))
        if down:
            parents.update(re.findall(r"['\"](\w+)['\"]", down.group(1)))
    return revisions - parents


def dsl_version(root: Path) -> str:
    """The app DSL version the release writes and imports without asking (``CURRENT_DSL_VERSION``
    or, in later releases, ``CURRENT_APP_DSL_VERSION``)."""
    api = root / "api"
    for path in (api / "constants" / "dsl_version.py", api / "services" / "app_dsl_service.py"):
        if path.is_file():
            match = re.search(r'^CURRENT_(?:APP_)?DSL_VERSION\s*=\s*"([\d.]+)"',
                              path.read_text(encoding="utf-8"), flags=re.MULTILINE)
            if match:
                return match.group(1)
    raise Unavailable("the release names no CURRENT_DSL_VERSION")


def celery_app(root: Path) -> str:
    """The Celery application the release's worker starts (``celery -A <app> worker``)."""
    text = (root / "api" / "docker" / "entrypoint.sh").read_text(encoding="utf-8")
    match = re.search(r"celery\s+-A\s+(\S+)\s+worker", text)
    if not match:
        raise Unavailable("api/docker/entrypoint.sh starts no Celery worker")
    return match.group(1)
