"""The lab: Docker containers that behave like SSH servers, for the integration tests.

Each lab host runs systemd as PID 1 and sshd, has a user ``deploy`` with passwordless sudo, and
accepts one ed25519 key made per session. The engine reaches a host as it would a real server:
SSH to the container's address on the lab's private network, port 22.

Images are built once and reused across runs: every tag carries a hash of its inputs.

- Base image: ``DIFYOPS_BASE_IMAGE`` (default ``debian:bookworm``). Used if present locally; else
  pulled (unless ``DIFYOPS_PULL_BASE=0``); else built with debootstrap from the machine's own
  Debian mirror and imported as ``difyops-test/base:bookworm-<hash>``.
- Host image: ``tests/hosts/systemd-ssh/Dockerfile`` on that base, as ``difyops-test/host:<hash>``.
- Docker host image (hosts started with ``docker=True``): ``tests/hosts/systemd-docker/Dockerfile``
  on the host image, as ``difyops-test/docker-host:<hash>``: the same host plus its own Docker
  engine (vfs driver) and compose v2, for the tiers deployed by compose. ``overlay2=True``
  gives that engine overlay2 on a volume of the machine instead (for big images).

Host keys: the lab records each host's SSH host keys (read from the container, not over the
network) in ``known_hosts`` in its key directory as it starts the host, and points
``DIFY_KNOWN_HOSTS`` at that file for the process and the ``inv`` commands it starts, so the
engine checks lab hosts as it checks real servers. A host started again, or a new container on an
address used before, gets its line rewritten; the lab's own SSH helpers check keys the same way.

Other settings: ``DIFYOPS_LAB_TIMEOUT`` (seconds a host may take to be ready, default 120) and
``DIFYOPS_LAB_PRIVILEGED=1`` (run hosts with --privileged, for engines where systemd needs it).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Ryuk (testcontainers' reaper) is an image that cannot be pulled everywhere; the lab removes its
# own containers and network. Must be set before testcontainers is imported.
os.environ["TESTCONTAINERS_RYUK_DISABLED"] = "true"

import docker
import docker.errors
import fabric
import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from testcontainers.core.container import DockerContainer

from tasks.core.gates import poll
from tasks.core.hostkeys import KNOWN_HOSTS_ENV

LOG = logging.getLogger("difyops.lab")

REPO_ROOT = Path(__file__).resolve().parents[2]
HOST_IMAGE_DIR = REPO_ROOT / "tests" / "hosts" / "systemd-ssh"
DEFAULT_BASE_IMAGE = "debian:bookworm"
BASE_REPO = "difyops-test/base"
HOST_REPO = "difyops-test/host"
DOCKER_HOST_IMAGE_DIR = REPO_ROOT / "tests" / "hosts" / "systemd-docker"
DOCKER_HOST_REPO = "difyops-test/docker-host"
# What a host needs to run its own Docker engine (without --privileged). SYS_PTRACE: runc joins
# the namespaces of a container whose process runs as another user (Dify's api runs as uid
# 1001) only with it, so `docker exec` and healthchecks fail without it.
DOCKER_HOST_KWARGS: dict[str, Any] = {
    "cap_add": ["SYS_ADMIN", "NET_ADMIN", "SYS_PTRACE"],
    "security_opt": ["seccomp=unconfined"],
}
SUITE = "bookworm"
DEBOOTSTRAP_INCLUDE = ("ca-certificates",)
# Bump when the way the base image is made changes (part of its tag's hash).
BASE_RECIPE = "debootstrap-minbase-v1"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
DEBIAN_SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
SOURCES_LIST = Path("/etc/apt/sources.list")
LABEL = "difyops.lab"
READY_STATES = ("running", "degraded")
HOST_KEY_FILES = "/etc/ssh/ssh_host_*_key.pub"
_KNOWN_HOSTS_LOCK = threading.Lock()  # hosts start in parallel threads


class LabError(RuntimeError):
    """The lab could not build an image or bring a host up."""


def _env_flag(name: str, default: bool = False) -> bool:
    """Read a boolean setting from the environment (1/true/yes/on)."""
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    return value.strip().lower() in ("1", "true", "yes", "on")


def _ready_timeout() -> float:
    """Seconds a host may take from container start until sshd accepts the key."""
    return float(os.environ.get("DIFYOPS_LAB_TIMEOUT", "120"))


# --- the machine's Debian mirror -----------------------------------------------------------


@dataclass(frozen=True)
class DebianMirror:
    """The machine's apt sources for bookworm, reused inside the lab's images."""

    uri: str
    suites: tuple[str, ...]
    security_uri: str | None


def _deb822_stanzas(text: str) -> list[dict[str, str]]:
    """Parse a deb822 sources file into one dict per stanza (continuation lines joined)."""
    stanzas: list[dict[str, str]] = []
    current: dict[str, str] = {}
    key: str | None = None
    for raw in text.splitlines():
        if raw.startswith("#"):
            continue
        if not raw.strip():
            if current:
                stanzas.append(current)
            current, key = {}, None
            continue
        if raw[0] in " \t" and key is not None:
            current[key] += " " + raw.strip()
            continue
        name, sep, value = raw.partition(":")
        if sep:
            key = name.strip().lower()
            current[key] = value.strip()
    if current:
        stanzas.append(current)
    return stanzas


def _one_line_entries(text: str) -> list[tuple[str, str]]:
    """Parse one-line ``deb [opts] URI SUITE COMPONENTS`` entries into (uri, suite) pairs."""
    entries: list[tuple[str, str]] = []
    for raw in text.splitlines():
        line = re.sub(r"\[[^\]]*\]", " ", raw.split("#", 1)[0]).split()
        if len(line) >= 3 and line[0] == "deb":
            entries.append((line[1], line[2]))
    return entries


def debian_mirror() -> DebianMirror | None:
    """Find the machine's Debian mirror: the entry whose Suites include bookworm.

    Reads ``/etc/apt/sources.list.d/debian.sources`` (deb822), else ``/etc/apt/sources.list``.
    Returns None on a machine without such an entry (for example an Ubuntu CI runner).
    """
    if DEBIAN_SOURCES.is_file():
        stanzas = [
            s
            for s in _deb822_stanzas(DEBIAN_SOURCES.read_text(encoding="utf-8", errors="replace"))
            if "deb" in s.get("types", "deb").split() and s.get("enabled", "yes") != "no"
        ]
        main = next((s for s in stanzas if SUITE in s.get("suites", "").split()), None)
        if main and main.get("uris"):
            suites = tuple(x for x in main["suites"].split() if x.startswith(SUITE))
            security = next(
                (s for s in stanzas if f"{SUITE}-security" in s.get("suites", "").split()), None
            )
            security_uri = (
                security["uris"].split()[0] if security and security.get("uris") else None
            )
            return DebianMirror(main["uris"].split()[0], suites, security_uri)
    if SOURCES_LIST.is_file():
        entries = _one_line_entries(SOURCES_LIST.read_text(encoding="utf-8", errors="replace"))
        uri = next((u for u, suite in entries if suite == SUITE), None)
        if uri:
            suites = tuple(s for u, s in entries if u == uri and s.startswith(SUITE))
            security_uri = next((u for u, s in entries if s == f"{SUITE}-security"), None)
            return DebianMirror(uri, suites, security_uri)
    return None


# --- images --------------------------------------------------------------------------------


def _digest(*parts: str | bytes) -> str:
    """Return a short sha256 of the given inputs (the tag of an image built from them)."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return h.hexdigest()[:16]


@contextlib.contextmanager
def build_lock(name: str = "lab-images") -> Iterator[None]:
    """Serialise builds of one kind of image between concurrent test runs on this machine."""
    path = Path(tempfile.gettempdir()) / f"difyops-{name}.lock"
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _image_exists(client: docker.DockerClient, name: str) -> bool:
    """True when the image is present locally."""
    try:
        client.images.get(name)
    except docker.errors.ImageNotFound:
        return False
    return True


def _base_fallback_tag(mirror: DebianMirror, suite: str = SUITE) -> str:
    """Tag of the debootstrap-built base image for this mirror, release and recipe."""
    inputs = _digest(BASE_RECIPE, suite, mirror.uri, ",".join(DEBOOTSTRAP_INCLUDE))
    return f"{BASE_REPO}:{suite}-{inputs}"


def _try_pull(name: str, timeout: float = 90) -> bool:
    """Try to pull an image with a short client timeout; False when no registry answers."""
    repo, _, tag = name.rpartition(":") if ":" in name.split("/")[-1] else (name, "", "latest")
    try:
        client = docker.from_env(timeout=int(timeout))
        try:
            client.images.pull(repo, tag=tag)
        finally:
            client.close()
    except Exception as exc:  # any failure means: build it instead
        LOG.info("pull of %s failed: %s", name, exc)
        return False
    return True


def _debootstrap_base(client: docker.DockerClient, mirror: DebianMirror, tag: str,
                      suite: str = SUITE) -> None:
    """Build a minimal root of ``suite`` with debootstrap and import it as ``tag``."""
    debootstrap = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
    if not Path(debootstrap).exists():
        raise LabError("debootstrap is not installed: run scripts/setup")
    if os.geteuid() != 0:
        raise LabError(f"building {tag} with debootstrap needs root")
    work = Path(tempfile.mkdtemp(prefix="difyops-base-"))
    try:
        root = work / "root"
        started = time.monotonic()
        cmd = [
            debootstrap,
            "--variant=minbase",
            f"--include={','.join(DEBOOTSTRAP_INCLUDE)}",
            suite,
            str(root),
            mirror.uri,
        ]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise LabError(f"debootstrap failed ({result.returncode}):\n{result.stdout[-3000:]}")
        for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for item in (root / leftover).glob("*"):
                if item.is_file():
                    item.unlink()
        archive = work / "root.tar"
        subprocess.run(
            ["tar", "-C", str(root), "--numeric-owner", "-cf", str(archive), "."], check=True
        )
        repo, _, version = tag.rpartition(":")
        client.api.import_image_from_file(
            str(archive),
            repository=repo,
            tag=version,
            changes=[
                "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                'CMD ["bash"]',
            ],
        )
        LOG.info("built %s with debootstrap in %.0f s", tag, time.monotonic() - started)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def ensure_base_image(client: docker.DockerClient, suite: str = SUITE) -> str:
    """Return the name of a base image of ``suite`` present locally, pulling or building it.

    Another release than bookworm (e.g. trixie, for packages only it ships) is ``debian:<suite>``
    or built with debootstrap from the same mirror.
    """
    if suite == SUITE:
        name = os.environ.get("DIFYOPS_BASE_IMAGE", "").strip() or DEFAULT_BASE_IMAGE
    else:
        name = f"debian:{suite}"
    if _image_exists(client, name):
        return name
    mirror = _mirror_for(suite)
    fallback = _base_fallback_tag(mirror, suite) if mirror else None
    if fallback and _image_exists(client, fallback):
        return fallback
    with build_lock():
        if _image_exists(client, name):
            return name
        if fallback and _image_exists(client, fallback):
            return fallback
        if _env_flag("DIFYOPS_PULL_BASE", default=True) and _try_pull(name):
            return name
        if not mirror or not fallback:
            raise LabError(
                f"base image {name} is not present, cannot be pulled, and this machine has no "
                "Debian bookworm apt source to debootstrap one from"
            )
        _debootstrap_base(client, mirror, fallback, suite)
    return fallback


def _host_build_inputs(base_id: str, mirror: DebianMirror | None) -> tuple[dict[str, str], str]:
    """Return the host image's build args and the hash of everything that goes into it."""
    args = {"BASE_IMAGE": base_id}
    if mirror:
        args["DEBIAN_MIRROR"] = mirror.uri
        args["DEBIAN_SUITES"] = " ".join(mirror.suites)
        if mirror.security_uri:
            args["DEBIAN_SECURITY_MIRROR"] = mirror.security_uri
    parts: list[str | bytes] = [f"{k}={v}" for k, v in sorted(args.items())]
    for path in sorted(HOST_IMAGE_DIR.rglob("*")):
        if path.is_file():
            parts += [str(path.relative_to(HOST_IMAGE_DIR)), path.read_bytes()]
    parts.append(CA_BUNDLE.read_bytes() if CA_BUNDLE.is_file() else b"")
    return args, _digest(*parts)


def _mirror_for(suite: str) -> DebianMirror | None:
    """The machine's mirror, for ``suite``: bookworm as the machine uses it; another release
    from the same mirror, its main suite only."""
    mirror = debian_mirror()
    if mirror is None or suite == SUITE:
        return mirror
    return DebianMirror(mirror.uri, (suite,), None)


def ensure_host_image(client: docker.DockerClient, suite: str = SUITE) -> str:
    """Return the tag of the systemd+sshd host image of ``suite``, building it once if missing."""
    base = ensure_base_image(client, suite)
    base_id = client.images.get(base).id
    args, inputs = _host_build_inputs(base_id, _mirror_for(suite))
    tag = f"{HOST_REPO}:{inputs}"
    if _image_exists(client, tag):
        return tag
    with build_lock():
        if _image_exists(client, tag):
            return tag
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="difyops-host-ctx-") as ctx:
            shutil.copytree(HOST_IMAGE_DIR, ctx, dirs_exist_ok=True)
            bundle = CA_BUNDLE.read_bytes() if CA_BUNDLE.is_file() else b""
            (Path(ctx) / "machine-ca-bundle.crt").write_bytes(bundle)
            builder = docker.from_env(timeout=900)
            try:
                builder.images.build(
                    path=ctx, tag=tag, buildargs=args, rm=True, forcerm=True, pull=False
                )
            except docker.errors.BuildError as exc:
                lines = [str(item.get("stream", item.get("error", ""))) for item in exc.build_log]
                raise LabError(f"building {tag} failed: {exc}\n{''.join(lines)[-4000:]}") from exc
            finally:
                builder.close()
        LOG.info("built %s in %.0f s", tag, time.monotonic() - started)
    return tag


def ensure_docker_host_image(client: docker.DockerClient) -> str:
    """Return the tag of the host image with its own Docker engine, building it once if missing."""
    host_id = client.images.get(ensure_host_image(client)).id
    parts: list[str | bytes] = [host_id]
    for path in sorted(DOCKER_HOST_IMAGE_DIR.rglob("*")):
        if path.is_file():
            parts += [str(path.relative_to(DOCKER_HOST_IMAGE_DIR)), path.read_bytes()]
    tag = f"{DOCKER_HOST_REPO}:{_digest(*parts)}"
    if _image_exists(client, tag):
        return tag
    with build_lock():
        if _image_exists(client, tag):
            return tag
        started = time.monotonic()
        builder = docker.from_env(timeout=900)
        try:
            builder.images.build(path=str(DOCKER_HOST_IMAGE_DIR), tag=tag,
                                 buildargs={"HOST_IMAGE": host_id}, rm=True, forcerm=True,
                                 pull=False)
        except docker.errors.BuildError as exc:
            lines = [str(item.get("stream", item.get("error", ""))) for item in exc.build_log]
            raise LabError(f"building {tag} failed: {exc}\n{''.join(lines)[-4000:]}") from exc
        finally:
            builder.close()
        LOG.info("built %s in %.0f s", tag, time.monotonic() - started)
    return tag


# --- keys ----------------------------------------------------------------------------------


def make_key_pair(directory: Path) -> tuple[Path, str]:
    """Write a new ed25519 key pair (OpenSSH format) into ``directory``.

    Returns the private key's path (mode 0600) and the public key line.
    """
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    path = directory / "id_ed25519"
    path.write_bytes(private)
    path.chmod(0o600)
    line = public.decode() + " difyops-lab"
    (directory / "id_ed25519.pub").write_text(line + "\n")
    return path, line


# --- hosts ---------------------------------------------------------------------------------


def _cgroup_mode() -> tuple[str, str]:
    """Return (mount mode, cgroupns mode) for /sys/fs/cgroup on this machine.

    cgroup v1 (tmpfs with one mount per controller): read-only bind mount is enough.
    cgroup v2 (cgroup2fs): systemd needs to write its own subtree, so mount it read-write.
    """
    try:
        kind = subprocess.run(
            ["stat", "-fc", "%T", "/sys/fs/cgroup"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        kind = ""
    if kind == "cgroup2fs":
        return "rw", "host"
    return "ro", "host"


@dataclass
class LabHost:
    """One container host of the lab, reachable over SSH at ``address`` port 22."""

    name: str
    address: str
    key_file: Path
    container: DockerContainer
    network_name: str = ""
    public_key: str = ""
    docker: bool = False
    volumes: list[str] = field(default_factory=list)  # named volumes removed with the host
    known_hosts: Path | None = None  # the lab's file of host keys

    def _wrapped(self) -> Any:
        """The docker SDK's Container object behind the testcontainers wrapper."""
        return self.container.get_wrapped_container()

    def exec(self, command: str, user: str = "root") -> tuple[int, str]:
        """Run ``bash -lc command`` in the container (docker exec); return (exit, output)."""
        result = self._wrapped().exec_run(["bash", "-lc", command], user=user, demux=False)
        output = result.output.decode("utf-8", errors="replace") if result.output else ""
        return int(result.exit_code if result.exit_code is not None else -1), output

    def inventory_entry(self, roles: list[str], user: str = "root") -> dict[str, Any]:
        """Return this host as an entry of a difyops inventory."""
        return {
            "name": self.name,
            "address": self.address,
            "connection": "ssh",
            "ssh": {"user": user, "port": 22, "key": str(self.key_file)},
            "roles": list(roles),
        }

    def fabric(self, user: str = "root") -> fabric.Connection:
        """Return a Fabric connection to this host as ``user``, with the lab's key only."""
        conn = fabric.Connection(
            host=self.address,
            user=user,
            port=22,
            connect_timeout=10,
            # No ~/.ssh/config; never read local stdin (pytest captures it).
            config=fabric.Config(
                overrides={"load_ssh_configs": False, "run": {"in_stream": False}}
            ),
            connect_kwargs={
                "key_filename": str(self.key_file),
                "look_for_keys": False,
                "allow_agent": False,
            },
        )
        conn.client = self._client()
        return conn

    def _client(self) -> paramiko.SSHClient:
        """An SSH client that trusts the host keys the lab recorded and no others (never
        ~/.ssh/known_hosts: lab addresses are reused between sessions)."""
        client = paramiko.SSHClient()
        if self.known_hosts is not None and self.known_hosts.is_file():
            client.get_host_keys().load(str(self.known_hosts))
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        return client

    def host_keys(self) -> list[str]:
        """The host's SSH public host keys as `type base64` (read through docker exec)."""
        code, out = self.exec(f"cat {HOST_KEY_FILES}")
        keys = [" ".join(line.split()[:2]) for line in out.splitlines()
                if line.strip() and not line.startswith("cat:")]
        if code != 0 or not keys:
            raise LabError(f"{self.name}: cannot read its SSH host keys: {out.strip()}")
        return keys

    def record_host_key(self) -> None:
        """Write the host's keys into the lab's known_hosts under its current address,
        replacing whatever was recorded for that address (this host before it was started
        again or had its keys made anew, or a removed container that had the address)."""
        if self.known_hosts is None:
            raise LabError(f"{self.name}: the lab has no known_hosts file")
        lines = [f"{self.address} {key}" for key in self.host_keys()]
        with _KNOWN_HOSTS_LOCK:
            old = self.known_hosts.read_text().splitlines() if self.known_hosts.exists() else []
            kept = [line for line in old if line.split()[:1] != [self.address]]
            staged = self.known_hosts.with_name(f".{self.known_hosts.name}.new")
            staged.write_text("".join(f"{line}\n" for line in [*kept, *lines]))
            staged.chmod(0o644)
            os.replace(staged, self.known_hosts)

    def refresh_address(self) -> str:
        """Re-read the container's address on the lab network (it may change on restart)."""
        wrapped = self._wrapped()
        wrapped.reload()
        networks = wrapped.attrs["NetworkSettings"]["Networks"]
        address = networks.get(self.network_name, {}).get("IPAddress", "")
        if not address:
            raise LabError(f"{self.name}: no address on network {self.network_name}")
        self.address = address
        return address

    def inject_key(self) -> None:
        """Write the lab's public key into root's and deploy's authorized_keys."""
        script = (
            'set -e; for home in /root /home/deploy; do u=$(stat -c %U "$home"); '
            'install -d -m 700 -o "$u" -g "$u" "$home/.ssh"; '
            'printf "%s\\n" "$LAB_KEY" > "$home/.ssh/authorized_keys"; '
            'chown "$u:$u" "$home/.ssh/authorized_keys"; chmod 600 "$home/.ssh/authorized_keys"; '
            "done"
        )
        result = self._wrapped().exec_run(
            ["sh", "-c", script], environment={"LAB_KEY": self.public_key}
        )
        if result.exit_code != 0:
            raise LabError(f"{self.name}: cannot write authorized_keys: {result.output!r}")

    def ssh_ok(self, user: str = "root", timeout: float = 5) -> bool:
        """True when sshd at the host's address accepts the lab key and runs a command."""
        client = self._client()
        try:
            client.connect(
                self.address,
                port=22,
                username=user,
                key_filename=str(self.key_file),
                look_for_keys=False,
                allow_agent=False,
                timeout=timeout,
                banner_timeout=timeout,
                auth_timeout=timeout,
            )
            _, stdout, _ = client.exec_command("true", timeout=timeout)
            return stdout.channel.recv_exit_status() == 0
        except (OSError, paramiko.SSHException, EOFError):
            return False
        finally:
            client.close()

    def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until systemd is up (running or degraded) and sshd accepts the lab key."""
        deadline = time.monotonic() + (timeout if timeout is not None else _ready_timeout())

        def until_deadline(attempt: Callable[[], tuple[bool, Any]], failure: str) -> Any:
            passed, answer = poll(attempt, max(deadline - time.monotonic(), 0), 0.2)
            if not passed:
                raise LabError(f"{self.name}: {failure} ({answer})")
            return answer

        state = until_deadline(self._systemd_state, "systemd not up in time")
        if state == "degraded":
            _, failed = self.exec("systemctl --failed --no-legend --plain | cut -d' ' -f1")
            LOG.warning("%s: systemd degraded, failed units: %s", self.name, failed.split())
        until_deadline(self._host_key_recorded, "no SSH host key to record")
        if self.docker:
            until_deadline(lambda: (self.exec("docker info >/dev/null 2>&1")[0] == 0, ""),
                           "the inner Docker engine does not answer")
        until_deadline(lambda: (self.ssh_ok(), ""),
                       f"sshd at {self.address}:22 refused the lab key")

    def _systemd_state(self) -> tuple[bool, str]:
        """(up, state) of systemd in the container; a container that stopped is an error."""
        wrapped = self._wrapped()
        wrapped.reload()
        if wrapped.status != "running":
            logs = wrapped.logs(tail=40).decode("utf-8", errors="replace")
            raise LabError(f"{self.name}: container is {wrapped.status}:\n{logs}")
        _, out = self.exec("systemctl is-system-running 2>/dev/null || true")
        state = out.strip().splitlines()[-1] if out.strip() else ""
        return state in READY_STATES, state

    def _host_key_recorded(self) -> tuple[bool, str]:
        """(recorded, why not) for sshd's keys, before anything connects to it."""
        try:
            self.record_host_key()
        except LabError as error:
            return False, str(error)
        return True, ""

    def stop(self) -> None:
        """Stop the container (systemd shuts down as on a real server): SSH then fails."""
        self._wrapped().stop(timeout=20)

    def start(self) -> None:
        """Start a stopped container again and wait until SSH answers (address re-read)."""
        self._wrapped().start()
        self.refresh_address()
        self.wait_ready()

    def remove(self) -> None:
        """Remove the container (and its volumes) for good."""
        with contextlib.suppress(docker.errors.NotFound):
            self.container.stop(force=True, delete_volume=True)
        self.remove_volumes()

    def remove_volumes(self) -> None:
        """Remove the named volumes of a removed container (an inner engine's storage)."""
        if not self.volumes:
            return
        client = docker.from_env(timeout=600)  # a volume of big images takes a while to delete
        try:
            for name in self.volumes:
                with contextlib.suppress(docker.errors.NotFound):
                    client.volumes.get(name).remove(force=True)
        finally:
            client.close()

    def use_overlay2(self, timeout: float = 60) -> None:
        """Switch the inner engine from vfs to overlay2 (its /var/lib/docker is a volume on the
        machine's disk, not overlay): containers of big images then start without a full copy."""
        code, out = self.exec(
            "sed -i 's/\"storage-driver\": \"vfs\"/\"storage-driver\": \"overlay2\"/' "
            "/etc/docker/daemon.json && systemctl restart docker")
        if code != 0:
            raise LabError(f"{self.name}: cannot switch the inner engine to overlay2: {out}")

        def on_overlay() -> tuple[bool, str]:
            driver = self.exec("docker info -f '{{.Driver}}'")[1].strip()
            return driver == "overlay2", driver

        passed, last = poll(on_overlay, timeout, 0.2)
        if not passed:
            raise LabError(f"{self.name}: the inner engine runs on {last!r}, not overlay2")


class Lab:
    """A set of container hosts on a private Docker network, with one session key."""

    def __init__(self, client: docker.DockerClient | None = None) -> None:
        """Prepare a lab: a Docker client, a fresh key pair and a network name (made lazily)."""
        self.client = client or docker.from_env(timeout=120)
        self.suffix = secrets.token_hex(4)
        self.network_name = f"difyops-lab-{self.suffix}"
        self.key_dir = Path(tempfile.mkdtemp(prefix="difyops-lab-key-"))
        self.key_file, self.public_key = make_key_pair(self.key_dir)
        self.known_hosts = self.key_dir / "known_hosts"
        self.known_hosts.write_text("")
        self._saved_known_hosts = os.environ.get(KNOWN_HOSTS_ENV)
        os.environ[KNOWN_HOSTS_ENV] = str(self.known_hosts)  # for the engine and its `inv`s
        self.hosts: dict[str, LabHost] = {}
        self.image: str | None = None
        self.images: dict[str, str] = {}  # other releases than bookworm: suite -> host image
        self.docker_image: str | None = None
        self._network: Any = None
        self.timings: dict[str, float] = {}

    def __enter__(self) -> Lab:
        """Use the lab as a context manager (closed on exit)."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Close the lab."""
        self.close()

    def host(self, name: str) -> LabHost:
        """Return the started host called ``name``."""
        return self.hosts[name]

    def bridge(self) -> str:
        """The host's interface of the lab's network (a Linux bridge: every packet between two
        lab hosts crosses it), created if it is not yet."""
        self._ensure_network()
        return f"br-{self._network.id[:12]}"

    def _ensure_network(self) -> None:
        """Create the lab's private bridge network on first use."""
        if self._network is None:
            self._network = self.client.networks.create(
                self.network_name, driver="bridge", labels={LABEL: self.suffix}
            )

    def _ensure_image(self, suite: str = SUITE) -> str:
        """Build (once) and return the host image tag (of another release when asked)."""
        if suite != SUITE:
            if suite not in self.images:
                started = time.monotonic()
                self.images[suite] = ensure_host_image(self.client, suite)
                self.timings[f"images {suite}"] = time.monotonic() - started
            return self.images[suite]
        if self.image is None:
            started = time.monotonic()
            self.image = ensure_host_image(self.client)
            self.timings["images"] = time.monotonic() - started
        return self.image

    def _ensure_docker_image(self) -> str:
        """Build (once) and return the tag of the host image with its own Docker engine."""
        if self.docker_image is None:
            started = time.monotonic()
            self.docker_image = ensure_docker_host_image(self.client)
            self.timings["docker host image"] = time.monotonic() - started
        return self.docker_image

    def _start_one(self, name: str, cap_add: tuple[str, ...] = (), suite: str = SUITE,
                   docker: bool = False, overlay2: bool = False) -> LabHost:
        """Create and start one host container, then wait until it is ready."""
        image = self._ensure_docker_image() if docker else self._ensure_image(suite)
        extra = dict(DOCKER_HOST_KWARGS) if docker else {}
        capabilities = [*extra.pop("cap_add", []), *cap_add]
        mount_mode, cgroupns = _cgroup_mode()
        if docker:
            mount_mode = "rw"  # the inner engine creates cgroups for its containers
        container = (
            DockerContainer(image)
            .with_name(f"{self.network_name}-{name}")
            .with_tmpfs_mount("/run")
            .with_tmpfs_mount("/run/lock")
            .with_volume_mapping("/sys/fs/cgroup", "/sys/fs/cgroup", mount_mode)
        )
        volumes = []
        if docker and overlay2:  # the inner engine's storage on the machine's disk
            volume = self.client.volumes.create(f"{self.network_name}-{name}-docker",
                                                labels={LABEL: self.suffix})
            volumes.append(volume.name)
            container = container.with_volume_mapping(volume.name, "/var/lib/docker", "rw")
        container = (
            container.with_kwargs(
                hostname=name,
                network=self.network_name,
                labels={LABEL: self.suffix, f"{LABEL}.host": name},
                cgroupns=cgroupns,
                privileged=_env_flag("DIFYOPS_LAB_PRIVILEGED"),
                **({"cap_add": capabilities} if capabilities else {}),
                **extra,
            )
        )
        host = LabHost(
            name=name,
            address="",
            key_file=self.key_file,
            container=container,
            network_name=self.network_name,
            public_key=self.public_key,
            docker=docker,
            volumes=volumes,
            known_hosts=self.known_hosts,
        )
        self.hosts[name] = host  # registered first: close() removes it even if start fails
        container.start()
        host.refresh_address()
        host.inject_key()
        host.wait_ready()
        if volumes:
            host.use_overlay2()
        return host

    def start(self, names: list[str], cap_add: tuple[str, ...] = (), suite: str = SUITE,
              docker: bool = False, overlay2: bool = False) -> list[LabHost]:
        """Start hosts ``names`` in parallel and wait until all are ready; return them in order.

        ``cap_add``: extra capabilities, e.g. ``("NET_ADMIN",)`` for hosts that get a firewall
        (nftables rules then apply to that host's own network namespace only).
        ``suite``: the Debian release of the hosts (default bookworm; e.g. trixie).
        ``docker=True``: hosts that run their own Docker engine (for compose tiers; bookworm).
        ``overlay2=True`` (with docker): that engine stores images with overlay2 on a volume of
        the machine (removed with the host) instead of vfs, which copies an image in full for
        every container: for big images such as the real Dify api (2.5 GB).
        """
        clash = [n for n in names if n in self.hosts]
        if clash or len(set(names)) != len(names):
            raise LabError(f"host names already used in this lab: {clash or names}")
        if docker:
            self._ensure_docker_image()
        else:
            self._ensure_image(suite)
        self._ensure_network()
        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=max(1, len(names))) as pool:
            futures = [pool.submit(self._start_one, n, tuple(cap_add), suite, docker, overlay2)
                       for n in names]
            errors = []
            hosts = []
            for future in futures:
                try:
                    hosts.append(future.result())
                except Exception as exc:  # report every host that failed
                    errors.append(exc)
        self.timings[f"start {' '.join(names)}"] = time.monotonic() - started
        if errors:
            raise LabError("; ".join(str(e) for e in errors)) from errors[0]
        return hosts

    def close(self) -> None:
        """Remove every container of the lab, its network and its key directory."""
        for host in list(self.hosts.values()):
            try:
                host.remove()
            except Exception as exc:  # keep removing the others
                LOG.warning("cannot remove %s: %s", host.name, exc)
        self.hosts.clear()
        if self._network is not None:
            with contextlib.suppress(docker.errors.NotFound):
                self._network.remove()
            self._network = None
        shutil.rmtree(self.key_dir, ignore_errors=True)
        if os.environ.get(KNOWN_HOSTS_ENV) == str(self.known_hosts):
            if self._saved_known_hosts is None:
                os.environ.pop(KNOWN_HOSTS_ENV, None)
            else:
                os.environ[KNOWN_HOSTS_ENV] = self._saved_known_hosts
