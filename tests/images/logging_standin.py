"""Build the stand-in Elasticsearch and Kibana images of the logging tests (see
elasticsearch-standin/es_standin.py).

Both are the dify stand-in's core image (Python and curl, see standin.py) plus the program, named
as the inventory names the real ones behind the registry-mirror prefix, e.g.
``difyops-standin/elasticsearch:8.15.3``. Rebuilt only when their inputs change (a label holds
the hash).
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import docker
import docker.errors

from tests.images import standin

HERE = Path(__file__).resolve().parent
PROGRAM = HERE / "elasticsearch-standin" / "es_standin.py"
ROLES = ("elasticsearch", "kibana")


def dockerfile(core: str, role: str, version: str) -> str:
    return (f"FROM {core}\n"
            "COPY es_standin.py /usr/local/lib/es-standin/es_standin.py\n"
            f"ENV STANDIN_ROLE={role} STANDIN_VERSION={version}\n"
            'ENTRYPOINT ["python3", "/usr/local/lib/es-standin/es_standin.py"]\n')


def ensure_images(client: docker.DockerClient, base_image: str,
                  images: dict[str, str]) -> dict[str, str]:
    """images: role -> name (e.g. elasticsearch -> difyops-standin/elasticsearch:8.15.3)."""
    core = standin.ensure_core(client, base_image)
    program = PROGRAM.read_bytes()
    for role, name in images.items():
        text = dockerfile(core, role, name.rsplit(":", 1)[-1])
        wanted = standin.digest(core, text, program)
        try:
            if client.images.get(name).labels.get(standin.LABEL) == wanted:
                continue
        except docker.errors.ImageNotFound:
            pass
        text += f"LABEL {standin.LABEL}={wanted}\n"
        context = io.BytesIO()
        with tarfile.open(fileobj=context, mode="w") as tar:
            for file_name, data in (("Dockerfile", text.encode()), ("es_standin.py", program)):
                info = tarfile.TarInfo(file_name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        context.seek(0)
        client.images.build(fileobj=context, custom_context=True, tag=name, rm=True,
                            pull=False)
    return images
