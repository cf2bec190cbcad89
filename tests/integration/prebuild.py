"""The real Dify images a session needs, built in the background from the session's start.

test_app_1161 needs the real agent backend of its release; test_real_dify and test_stack need the
real api of the releases ``real_lab.pick_releases`` chooses. Each module builds what it needs when
it starts, minutes of downloads one after the other. Started here, in the order the modules run,
the builds overlap the modules before them. A module still asks for its image as before: it finds
it built, waits for the build in progress (the build lock), or builds it itself when the build
here failed, and then reports why.
"""

from __future__ import annotations

import logging
import tempfile
import threading
from pathlib import Path
from types import ModuleType

import docker

from tests.images import dify_real

LOG = logging.getLogger("difyops.lab")
AGENT_MODULE = "tests.integration.test_app_1161"  # its VERSION: the agent backend's release
API_MODULES = frozenset({"tests.integration.test_real_dify", "tests.integration.test_stack"})


def start(modules: list[ModuleType]) -> threading.Thread | None:
    """Build, in a daemon thread, the real images the given test modules need (None: none)."""
    agent = [module.VERSION for module in modules if module.__name__ == AGENT_MODULE]
    api = any(module.__name__ in API_MODULES for module in modules)
    if not agent and not api:
        return None
    thread = threading.Thread(target=_build, args=(agent, api), name="difyops-prebuild",
                              daemon=True)
    thread.start()
    return thread


def _build(agent_versions: list[str], api: bool) -> None:
    """The agent backend images, then the api of each release the real-Dify lab picks."""
    from tests.integration.lab import ensure_base_image
    from tests.integration.real_lab import pick_releases

    client = docker.from_env(timeout=600)
    try:
        base = ensure_base_image(client)
        for version in agent_versions:
            dify_real.ensure_built(client, base, version, dify_real.AGENT_BACKEND)
        if api:
            with tempfile.TemporaryDirectory(prefix="difyops-prebuild-") as scratch:
                for version, _ in pick_releases(Path(scratch)):
                    dify_real.ensure_built(client, base, version, dify_real.API)
    except Exception as exc:  # the module that needs the image builds it and says why
        LOG.warning("background build of the real Dify images stopped: %s", exc)
    finally:
        client.close()
