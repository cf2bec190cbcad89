"""Rendering: Jinja2 over the project's template folders, strict about undefined names.

One template serves every host that needs it: the context carries the inventory, the host being
rendered for, the Dify version profile and the secrets.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined, TemplateError

from tasks.core.errors import DifyopsError
from tasks.core.inventory import Host, Inventory
from tasks.core.project import ROOT


class Renderer:
    """Renders templates (named by their path in the project, e.g. nginx/dify.conf.j2)."""

    def __init__(self, inventory: Inventory) -> None:
        self.inventory = inventory

    @cached_property
    def environment(self) -> Environment:
        """The Jinja2 environment: strict, keeps trailing newlines, tidy blocks."""
        environment = Environment(loader=FileSystemLoader(str(ROOT)), undefined=StrictUndefined,
                                  keep_trailing_newline=True, trim_blocks=True,
                                  lstrip_blocks=True, autoescape=False)
        environment.filters["env_quote"] = env_quote
        return environment

    def context(self, host: Host | None, extra: dict[str, Any]) -> dict[str, Any]:
        """Names every template can use."""
        inventory = self.inventory
        return {
            "inventory": inventory,
            "settings": inventory.settings,
            "profile": inventory.profile,
            "hosts": inventory.hosts,
            "host": host,
            "secrets": inventory.secrets,
            "with_role": inventory.with_role,
            "image": inventory.image,
            **extra,
        }

    def render(self, template: str, host: Host | None = None, **extra: Any) -> str:
        """The template rendered for a host; errors name the template and the host."""
        try:
            return self.environment.get_template(template).render(self.context(host, extra))
        except TemplateError as exc:
            where = f" for {host.name}" if host else ""
            raise DifyopsError(f"cannot render {template}{where}: {exc}") from exc


def env_quote(value: Any) -> str:
    """A value safe in an env file read by both docker compose and python-dotenv."""
    text = str(value)
    if text and all(c.isalnum() or c in "-_./:@,+=" for c in text):
        return text
    return "'" + text.replace("'", "") + "'"
