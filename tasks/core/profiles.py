"""Dify version profiles: what one Dify release needs (images, queues, services, routes, env).

Each profile is reviewed YAML in config/profiles/<version>.yml, checked against the release's own
source by tests/unit/test_dify_source.py (tasks/core/dify_source.py reads that source).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import yaml

from tasks.core.project import PROFILE_DIR

# gunicorn 25.1.0 added a control socket served by a thread of the arbiter; the release notes and
# `--no-control-socket` (gunicorn's own settings reference) date it.
GUNICORN_CONTROL_SOCKET = (25, 1, 0)


@dataclass(frozen=True)
class UpgradeStep:
    """A release-specific command an upgrade runs once, after the migration, on reaching the
    release that declares it: `flask <command...>` in a one-off container of its api image."""

    name: str
    command: tuple[str, ...]
    why: str


@dataclass(frozen=True)
class VersionProfile:
    """The facts about one Dify release that templates and checks depend on."""

    version: str
    images: dict[str, str]
    queues: tuple[str, ...]
    celery_app: str
    services: tuple[str, ...]
    routes: dict[str, tuple[str, ...]]
    weaviate_min_version: str
    env_required: tuple[str, ...]
    upgrade_steps: tuple[UpgradeStep, ...] = ()
    min_compose: str = ""
    min_kernel: dict[str, str] = field(default_factory=dict)
    gunicorn: str = ""

    def has(self, service: str) -> bool:
        """Whether this release has the named service (e.g. api_websocket)."""
        return service in self.services

    @property
    def gunicorn_control_socket(self) -> bool:
        """Whether the api's gunicorn opens a control socket unless told not to (25.1.0+)."""
        return bool(self.gunicorn) and version_key(self.gunicorn) >= GUNICORN_CONTROL_SOCKET


def available_versions(folder: Path = PROFILE_DIR) -> list[str]:
    """Every Dify version difyops has a profile for, oldest first."""
    return sorted((path.stem for path in folder.glob("*.yml")), key=version_key)


@cache
def load_profile(version: str, folder: Path = PROFILE_DIR) -> VersionProfile:
    """Read config/profiles/<version>.yml; the caller has checked that it exists."""
    data = yaml.safe_load((folder / f"{version}.yml").read_text())
    return VersionProfile(
        version=str(data["version"]),
        images=dict(data["images"]),
        queues=tuple(data["queues"]),
        celery_app=str(data["celery_app"]),
        services=tuple(data["services"]),
        routes={name: tuple(paths) for name, paths in data["routes"].items()},
        weaviate_min_version=str(data["weaviate_min_version"]),
        env_required=tuple(data["env_required"]),
        upgrade_steps=tuple(UpgradeStep(str(step["name"]), tuple(step["command"]),
                                        str(step["why"]))
                            for step in data.get("upgrade_steps", ())),
        min_compose=str(data.get("min_compose", "")),
        min_kernel={str(k): str(v) for k, v in data.get("min_kernel", {}).items()},
        gunicorn=str(data.get("gunicorn", "")),
    )


def steps_between(old: str, new: str, folder: Path = PROFILE_DIR) -> list[tuple[str, UpgradeStep]]:
    """The upgrade steps of every release after `old` up to and including `new`, oldest release
    first, as (release, step)."""
    low, high = version_key(old), version_key(new)
    return [(version, step) for version in available_versions(folder)
            if low < version_key(version) <= high
            for step in load_profile(version, folder).upgrade_steps]


def version_key(version: str) -> tuple[int, ...]:
    """A sortable key for dotted versions ("1.27.0" > "1.19.0"); non-numeric parts count as 0."""
    return tuple(int(part) if part.isdigit() else 0 for part in version.split("."))
