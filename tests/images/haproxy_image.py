"""A real HAProxy image for the lab: the app tier's ``redis_proxy`` (on every app host with
tls.internal, and in Sentinel mode).

No registry serves ``haproxy:2.8`` here, so the lab builds HAProxy from Debian 12's package on
its base image (HAProxy 2.6: the same program and configuration language), with the official
image's layout: the configuration at /usr/local/etc/haproxy/haproxy.cfg, ``haproxy`` on the
PATH. Tagged with the name the inventory gives it (``cache.proxy_image`` of config/defaults.yml
behind a registry-mirror prefix) and rebuilt only when its inputs change (a label holds their
hash).
"""

from __future__ import annotations

import io

import docker
import docker.errors

from tasks.core.project import DEFAULTS_FILE
from tasks.core.schema import load_defaults
from tests.images import standin

LABEL = "difyops.haproxy.inputs"
STEPS = """\
RUN set -eu; export DEBIAN_FRONTEND=noninteractive; apt-get update -q; \\
    apt-get install -y -q --no-install-recommends haproxy; \\
    apt-get clean; rm -rf /var/lib/apt/lists/*; mkdir -p /usr/local/etc/haproxy; \\
    haproxy -v
STOPSIGNAL SIGUSR1
CMD ["haproxy", "-W", "-db", "-f", "/usr/local/etc/haproxy/haproxy.cfg"]
"""


def image_name(prefix: str = standin.PREFIX) -> str:
    """The redis_proxy image as an inventory with this registry-mirror prefix names it."""
    defaults, _ = load_defaults(DEFAULTS_FILE)
    return prefix + str(defaults["cache"]["proxy_image"])


def ensure_haproxy(client: docker.DockerClient, base_image: str,
                   prefix: str = standin.PREFIX) -> str:
    """The HAProxy image under the inventory's name, built once per set of inputs."""
    name = image_name(prefix)
    text = f"FROM {client.images.get(base_image).id}\n{STEPS}"
    wanted = standin.digest(text)
    try:
        if client.images.get(name).labels.get(LABEL) == wanted:
            return name
    except docker.errors.ImageNotFound:
        pass
    text += f"LABEL {LABEL}={wanted}\n"
    client.images.build(fileobj=io.BytesIO(text.encode()), tag=name, rm=True, pull=False)
    return name
