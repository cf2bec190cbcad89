"""Dify version profiles: what one Dify release needs (images, queues, services, routes, env)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

import yaml

from tasks.core.project import PROFILE_DIR


@dataclass(frozen=True)
class VersionProfile:
    """The facts about one Dify release that templates and checks depend on."""

    version: str
    images: dict[str, str]
    queues: tuple[str, ...]
    services: tuple[str, ...]
    routes: dict[str, tuple[str, ...]]
    weaviate_min_version: str
    env_required: tuple[str, ...]

    def has(self, service: str) -> bool:
        """Whether this release has the named service (e.g. api_websocket)."""
        return service in self.services


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
        services=tuple(data["services"]),
        routes={name: tuple(paths) for name, paths in data["routes"].items()},
        weaviate_min_version=str(data["weaviate_min_version"]),
        env_required=tuple(data["env_required"]),
    )


def version_key(version: str) -> tuple[int, ...]:
    """A sortable key for dotted versions ("1.27.0" > "1.19.0"); non-numeric parts count as 0."""
    return tuple(int(part) if part.isdigit() else 0 for part in version.split("."))
