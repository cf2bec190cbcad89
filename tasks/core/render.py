"""Rendering: Jinja2 over the project's template folders, strict about undefined names.

One template serves every host that needs it: the context carries the inventory, the host being
rendered for, the Dify version profile and the secrets.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from functools import cached_property
from pathlib import Path
from typing import Any
from urllib.parse import quote

from jinja2 import Environment, FileSystemLoader, StrictUndefined, TemplateError

from tasks.core import placement, shell
from tasks.core.errors import DifyopsError
from tasks.core.inventory import Host, Inventory, endpoint
from tasks.core.plan import TierPlan
from tasks.core.project import ROOT
from tasks.core.tls import CONTAINER_CA


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
        environment.filters["cidr"] = cidr
        environment.filters["squid_word"] = squid_word
        environment.filters["redis_url"] = redis_url
        environment.filters["sql_literal"] = sql_literal
        environment.filters["shell_quote"] = shell.quote  # files a shell sources
        environment.filters["redis_quote"] = redis_quote
        environment.filters["redis_acl_password"] = redis_acl_password
        environment.filters["pgpass_field"] = pgpass_field
        environment.filters["compose_quote"] = compose_quote
        environment.globals["resp_hex"] = resp_hex
        environment.globals["endpoint"] = endpoint
        environment.globals["ca_path"] = CONTAINER_CA  # a host's own path overrides it
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
            # Where the services of newer releases run (tasks/core/placement.py).
            "runs_websocket": placement.websocket_enabled(inventory),
            "agent_host": placement.agent_host(inventory),
            **extra,
        }

    def render(self, template: str, host: Host | None = None, **extra: Any) -> str:
        """The template rendered for a host; errors name the template and the host."""
        try:
            return self.environment.get_template(template).render(self.context(host, extra))
        except TemplateError as exc:
            where = f" for {host.name}" if host else ""
            raise DifyopsError(f"cannot render {template}{where}: {exc}") from exc


def cidr(address: str) -> str:
    """A single address as a CIDR block (/32 or /128); a DNS name is left as it is."""
    try:
        return str(ipaddress.ip_network(address))
    except ValueError:
        return address


SQUID_WORD = re.compile(r"^[A-Za-z0-9._:-]+$")


def squid_word(value: Any) -> str:
    """A value safe as one word of a squid.conf line (a host name or an address)."""
    text = str(value)
    if not SQUID_WORD.match(text):
        raise DifyopsError(f"{text!r} cannot be written into squid.conf: use a host name or an "
                           f"IP address (letters, digits, '.', ':', '-')")
    return text


def redis_url(address: str, scheme: str, password: str, port: int, db: int,
              ca: str = "", user: str = "") -> str:
    """A redis://, rediss:// or sentinel:// URL (Celery's broker, Dify's pub/sub) with the user
    name and password percent-encoded, so that `@`, `:`, `/` or `%` in them cannot change where
    the URL points. `ca`: the server is verified with this CA file (redis-py reads the query);
    no user: Redis' `default` user."""
    verified = f"?ssl_cert_reqs=required&ssl_ca_certs={quote(ca, safe='/')}" if ca else ""
    login = f"{quote(user, safe='')}:{quote(str(password), safe='')}"
    return f"{scheme}://{login}@{endpoint(address, port)}/{db}{verified}"


def resp_hex(*words: str) -> str:
    """A Redis command in the protocol's own framing (RESP), hex-encoded: what HAProxy's
    `tcp-check send-binary` sends, so a password needs no escaping in its configuration."""
    frame = f"*{len(words)}\r\n".encode()
    for word in words:
        data = str(word).encode()
        frame += b"$%d\r\n%s\r\n" % (len(data), data)
    return frame.hex()


def env_quote(value: Any) -> str:
    """A value safe in an env file read by both docker compose and python-dotenv: as it is when
    plain, else single-quoted (literal for both). A value neither can read back identically
    (a quote, a backslash, a control character) is an error: nothing is ever deleted from it."""
    text = str(value)
    if text and all(c.isalnum() or c in "-_./:@,+=" for c in text):
        return text
    if "'" in text or "\\" in text or not text.isprintable():
        raise DifyopsError("a value for an env file holds a quote, a backslash or a control "
                           "character, which docker compose and python-dotenv read differently")
    return "'" + text + "'"


def sql_literal(value: Any) -> str:
    """A PostgreSQL string literal (standard_conforming_strings: quotes doubled)."""
    text = str(value)
    if "\0" in text:
        raise DifyopsError("a value for SQL holds a NUL character")
    return "'" + text.replace("'", "''") + "'"


def redis_acl_password(value: Any) -> str:
    """A password in a Redis ACL rule, as its SHA-256 (`#<hex>`): the users file holds no
    password, and no value needs quoting there."""
    return "#" + hashlib.sha256(str(value).encode()).hexdigest()


def redis_quote(value: Any) -> str:
    """A value for redis.conf or sentinel.conf: bare when plain, else double-quoted with
    backslash escapes (what Redis' own config parser reads back)."""
    text = str(value)
    if text and all(c.isalnum() or c in "-_./:@,+=" for c in text):
        return text
    if not text.isprintable():
        raise DifyopsError("a value for redis.conf holds a control character")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def compose_quote(value: Any) -> str:
    """A value for a compose file: a YAML double-quoted string (JSON's form), `$` doubled so
    compose does not interpolate it."""
    return json.dumps(str(value).replace("$", "$$"))


def pgpass_field(value: Any) -> str:
    """A field of a .pgpass line: `:` and `\\` escaped with a backslash."""
    return str(value).replace("\\", "\\\\").replace(":", "\\:")


def write_tree(plans: list[TierPlan], out: Path) -> int:
    """Write every file of the plans under out/<host>/<path> (secrets 0600); return the count."""
    count = 0
    for tier in plans:
        for host_plan in tier.hosts:
            for step in host_plan.files():
                target = out / host_plan.host.name / step.path.lstrip("/")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(step.content)
                target.chmod(0o600 if step.secret else 0o644)
                count += 1
    return count
