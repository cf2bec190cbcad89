"""Build REAL images of a Dify release from the release's source, for the lab.

Two recipes, one builder: API (the dify-api image: api, worker and beat; Dockerfile template
tests/images/dify-api-real/) and AGENT_BACKEND (1.16.1's dify-agent-backend image, from the
release's dify-agent/ folder; template tests/images/dify-agent-backend-real/). Each image is
built FROM the lab's Debian 12 base image with this machine's Python 3.12 copied in and the
dependencies installed by the ``uv sync`` command of the release's own Dockerfile for that
folder, from PyPI (the machine's CA bundle is given to the build, and removed after). It is
tagged ``difyops-test/<template folder>:<hash of its inputs>`` (which keeps the cache) and
under the name the version profile gives its component behind a registry mirror prefix of the
caller's (e.g. ``difyops-real/langgenius/dify-api:<version>``; never the stand-ins' prefix,
whose names the stand-in tests build and own): an inventory with that ``dify.registry_mirror``
then deploys the real component. A second run rebuilds nothing.

Python 3.12: ``DIFYOPS_PYTHON312`` (an interpreter) when set, else ``python3.12`` on the PATH,
else ``pyenv prefix 3.12``; the interpreter's ``sys.base_prefix`` is copied to /usr/local.
The release's source: see tests/images/dify_source.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import docker
import docker.errors

from tasks.core.profiles import load_profile
from tests.images import dify_source, standin
from tests.integration.lab import build_lock

HERE = Path(__file__).resolve().parent
REPO_OWNER = "difyops-test"
LABEL = "difyops.real.inputs"
PYTHON_ENV = "DIFYOPS_PYTHON312"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
# Parts of the interpreter's prefix the image does without (tests, GUI, other tools' packages).
PYTHON_SKIP = ("test", "idlelib", "tkinter", "turtledemo", "__pycache__", "lib2to3")


@dataclass(frozen=True)
class Python312:
    """An interpreter of this machine: its prefix (``sys.base_prefix``) and exact version."""

    prefix: Path
    version: str


@dataclass(frozen=True)
class Recipe:
    """One real image of a release: the profile's component it serves, the release's folder it
    is built from (which holds its Dockerfile, pyproject.toml and uv.lock) and the folder of
    its Dockerfile template here (whose name is also the image's repository and build lock)."""

    component: str
    folder: str
    context: Path

    @property
    def repo(self) -> str:
        """The repository of the image's cache tags."""
        return f"{REPO_OWNER}/{self.context.name}"


API = Recipe("api", "api", HERE / "dify-api-real")
AGENT_BACKEND = Recipe("agent_backend", "dify-agent", HERE / "dify-agent-backend-real")


@dataclass(frozen=True)
class Built:
    """A real image of a release: its names and what the build cost (0 when cached)."""

    tag: str
    name: str
    version: str
    seconds: float
    size: int


def _ask(interpreter: str) -> Python312 | None:
    """The prefix and version of ``interpreter`` if it runs and is a Python 3.12."""
    try:
        out = subprocess.run(
            [interpreter, "-c", "import sys, platform; "
             "print(sys.base_prefix); print(platform.python_version())"],
            capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = out.stdout.split()
    if out.returncode != 0 or len(lines) != 2 or not lines[1].startswith("3.12."):
        return None
    prefix = Path(lines[0])
    return Python312(prefix, lines[1]) if (prefix / "bin" / "python3.12").is_file() else None


def find_python312() -> Python312:
    """This machine's Python 3.12 (see the module doc); Unavailable when there is none."""
    candidates = [os.environ.get(PYTHON_ENV, "").strip(), shutil.which("python3.12") or ""]
    pyenv = shutil.which("pyenv")
    if pyenv:
        out = subprocess.run([pyenv, "prefix", "3.12"], capture_output=True, text=True,
                             timeout=30, check=False)
        if out.returncode == 0 and out.stdout.strip():
            candidates.append(str(Path(out.stdout.strip().splitlines()[0]) / "bin/python3.12"))
    for candidate in filter(None, candidates):
        found = _ask(candidate)
        if found:
            return found
    raise dify_source.Unavailable(
        f"no Python 3.12 on this machine (tried {PYTHON_ENV}, python3.12 on the PATH, "
        "pyenv prefix 3.12): the images of Dify need exactly 3.12")


def _python_digest(python: Python312) -> str:
    """What identifies the interpreter: version, prefix, and its executable and library."""
    h = hashlib.sha256(f"{python.version}\0{python.prefix}".encode())
    for name in ("bin/python3.12", "lib/libpython3.12.so.1.0"):
        path = python.prefix / name
        if path.is_file():
            h.update(path.read_bytes())
    return h.hexdigest()


def _copy_python(python: Python312, into: Path) -> None:
    """The interpreter's prefix into ``into`` (bin/python*, include, lib without tests/GUI;
    of its site-packages only pip, which the build uses to install uv)."""
    into.mkdir()
    (into / "bin").mkdir()
    for item in (python.prefix / "bin").iterdir():
        if item.name.startswith("python"):
            shutil.copy2(item, into / "bin" / item.name, follow_symlinks=False)
    shutil.copytree(python.prefix / "include", into / "include", symlinks=True)

    def ignore(folder: str, names: list[str]) -> set[str]:
        skipped = {n for n in names if n in PYTHON_SKIP or n.startswith("_tkinter")}
        if Path(folder).name == "site-packages":
            skipped |= {n for n in names if not n.startswith("pip")}
        return skipped

    shutil.copytree(python.prefix / "lib", into / "lib", symlinks=True, ignore=ignore)


def dockerfile(root: Path, recipe: Recipe) -> str:
    """The Dockerfile of the release's image: the template with the production stage's ENV."""
    env = dify_source.production_env(root, recipe.folder)
    lines = "ENV " + " \\\n    ".join(f"{k}={json.dumps(v)}" for k, v in sorted(env.items()))
    template = (recipe.context / "Dockerfile").read_text(encoding="utf-8")
    marker = next(line for line in template.splitlines() if line.startswith("# RELEASE_ENV"))
    return template.replace(marker, lines)


def _inputs(recipe: Recipe, base_id: str, source: Path, python: Python312) -> str:
    """The hash of everything that goes into the image (its cache key)."""
    template = (recipe.context / "Dockerfile").read_bytes()
    return standin.digest(f"{recipe.context.name}-v1", base_id, template,
                          dify_source.digest_of(source, recipe.folder), _python_digest(python))


def _cached(client: docker.DockerClient, tag: str, wanted: str) -> bool:
    """True when ``tag`` exists and was built from the same inputs."""
    try:
        return client.images.get(tag).labels.get(LABEL) == wanted
    except docker.errors.ImageNotFound:
        return False


def _build(root: Path, recipe: Recipe, python: Python312, base_id: str, tag: str,
           inputs: str) -> None:
    """docker build of the release's image in a temporary context (the template's Dockerfile,
    the interpreter, the CA bundle and the release's folder under its own name)."""
    with tempfile.TemporaryDirectory(prefix="difyops-real-ctx-") as scratch:
        ctx = Path(scratch)
        (ctx / "Dockerfile").write_text(dockerfile(root, recipe), encoding="utf-8")
        bundle = CA_BUNDLE.read_bytes() if CA_BUNDLE.is_file() else b""
        (ctx / "build-ca.crt").write_bytes(bundle)
        _copy_python(python, ctx / "python")
        shutil.copytree(root / recipe.folder, ctx / recipe.folder, symlinks=True,
                        ignore=shutil.ignore_patterns(".venv", ".env", "__pycache__"))
        args = {"BASE_IMAGE": base_id,
                "UV_VERSION": dify_source.uv_version(root, recipe.folder),
                "UV_SYNC": dify_source.uv_sync_command(root, recipe.folder)}
        # A low CPU weight: built in the background (tests/integration/prebuild.py), it gives
        # way to the lab's hosts, whose tests have deadlines.
        standin.build_folder(scratch, tag, args, labels={LABEL: inputs}, timeout=3600,
                             cpu_shares=128)


def ensure_image(client: docker.DockerClient, base_image: str, version: str, prefix: str,
                 recipe: Recipe) -> Built:
    """The real image of ``recipe`` of Dify ``version``, built once per set of inputs and
    tagged under the profile's name of its component behind ``prefix``; Unavailable without
    the source (or the release's folder), the component in the profile, or Python."""
    tag, seconds = ensure_built(client, base_image, version, recipe)
    name = prefix + load_profile(version).images[recipe.component]
    image = client.images.get(tag)
    if name not in image.tags:
        image.tag(*name.rsplit(":", 1))
    return Built(tag, name, version, seconds, int(image.attrs["Size"]))


def ensure_built(client: docker.DockerClient, base_image: str, version: str,
                 recipe: Recipe) -> tuple[str, float]:
    """The cache tag of the real image of ``recipe`` of Dify ``version``, built unless it is
    (or another run is building it: the build lock), and the seconds a build here took (0 when
    it was cached). Unavailable as ensure_image."""
    source = dify_source.source_for(version)
    if recipe.component not in load_profile(version).images:
        raise dify_source.Unavailable(f"Dify {version} has no {recipe.component}")
    python = find_python312()
    base_id = client.images.get(base_image).id
    inputs = _inputs(recipe, base_id, source, python)
    tag = f"{recipe.repo}:{inputs}"
    started = time.monotonic()
    built = False
    with build_lock(recipe.context.name):  # another run may be building the same image
        if not _cached(client, tag, inputs):
            built = True
            with tempfile.TemporaryDirectory(prefix="difyops-real-src-") as unpacked:
                root = dify_source.unpack(source, Path(unpacked))
                if not (root / recipe.folder / "Dockerfile").is_file():
                    raise dify_source.Unavailable(
                        f"{source} holds no {recipe.folder}/ folder with its Dockerfile")
                found = dify_source.version_of(root, recipe.folder)
                if found != version:
                    raise dify_source.Unavailable(
                        f"{source}: {recipe.folder}/ is Dify {found}, not {version}")
                _build(root, recipe, python, base_id, tag, inputs)
    return tag, time.monotonic() - started if built else 0.0
