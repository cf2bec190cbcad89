"""Secrets: which an inventory needs, reading them, refusing published ones, generating the rest.

Secrets live in a python-dotenv file outside version control, mode 0600, generated with the
`secrets` module, never overwritten, never printed; or (`secrets.source: command`) they come
from the operator's own command (a vault's CLI), run once per run on this machine, held in
memory only. Either way every value is checked the same.
"""

from __future__ import annotations

import base64
import io
import os
import re
import secrets as random
import stat
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

from dotenv import dotenv_values

from tasks.core import placement, shell
from tasks.core.errors import Problem
from tasks.core.inventory import Inventory
from tasks.core.project import display

MIN_LENGTH = 16
BASE64URL = re.compile(r"^[A-Za-z0-9_-]+$")

# Values published in Dify's example files and in the original plan, plus obvious placeholders.
PUBLISHED = frozenset({
    "sk-9f73s3ljTXVcMT3Blb3ljTqtsKiGHXVcMT3BlbkFJLK7U",
    "difyai123456",
    "dify-sandbox",
    "inner-api-key",
    "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY",
    "dify-agent-run-token-for-dev-only",
    "lYkiYYT6owG+71oLerGzA7GXCgOT++6ovaezWAjpCjf+Sjc3ZtU+qUEi",
    "QaHbTe77CtuXmsfyhR7+vRjI/+XbV1AaFy691iy+kGDv2Jvy0/eAh8Y1",
    "WVF5YThaHlkYwhGUSmCRgsX3tD5ngdN8pkih",
    "your_secure_password",
    "your_redis_password",
    "replication_password",
    "your_weaviate_key",
    "your_admin_password",
    "admin",
    "password",
    "changeme",
    "elastic",
    "kibana",
})


@dataclass(frozen=True)
class SecretSpec:
    """A secret the deployment uses: when it is needed and whether difyops may generate it."""

    name: str
    purpose: str
    needed: Callable[[Inventory], bool]
    generated: bool = True
    # Why a value of the right length is still unusable (None: it is fine).
    shape: Callable[[str], str | None] | None = None


def always(_: Inventory) -> bool:
    """Needed by every inventory."""
    return True


def runs_agent(inventory: Inventory) -> bool:
    """Needed where the release runs the agent services (Dify 1.16.1+)."""
    return placement.agent_host(inventory) is not None


def one_word(value: str) -> str | None:
    """The plugin daemon's database password: the daemon writes it unquoted into a libpq
    connection string (`password=...`), where a space would end it."""
    if any(character.isspace() for character in value):
        return "holds a space, which the plugin daemon's database connection string cuts at"
    return None


def base64url_32(value: str) -> str | None:
    """The agent backend's server secret: unpadded base64url of exactly 32 bytes (it refuses to
    start otherwise)."""
    text = value.strip()
    if not BASE64URL.match(text):
        return "is not unpadded base64url text (the agent backend refuses it)"
    if len(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))) != 32:
        return "does not decode to exactly 32 bytes (the agent backend refuses it)"
    return None


SPECS: tuple[SecretSpec, ...] = (
    SecretSpec("SECRET_KEY", "signs sessions and encrypts stored credentials", always),
    SecretSpec("DB_PASSWORD", "the dify database role", always),
    SecretSpec("DB_PLUGIN_PASSWORD", "the dify_plugin database role (the plugin daemon's own, "
               "owner of the database dify_plugin)", always, shape=one_word),
    SecretSpec("DB_REPLICATION_PASSWORD", "the streaming replication role",
               lambda inv: bool(inv.with_role("db_replica"))),
    SecretSpec("REDIS_PASSWORD", "Redis' default user (Dify's cache, pub/sub and Celery broker; "
               "dangerous commands denied) and Sentinel", always),
    SecretSpec("REDIS_ADMIN_PASSWORD", "Redis' user difyops (every command): replication, "
               "Sentinel's link to Redis, the cache tier's tools", always),
    SecretSpec("REDIS_PLUGIN_DAEMON_PASSWORD", "Redis' user plugin_daemon (dangerous commands "
               "denied)", always),
    SecretSpec("REDIS_AGENT_PASSWORD", "Redis' user agent_backend (dangerous commands denied)",
               runs_agent),
    SecretSpec("REDIS_MONITOR_PASSWORD", "Redis' user monitor (PING, INFO, CONFIG GET...): "
               "redis_proxy's health checks and the metrics exporter", always),
    SecretSpec("SANDBOX_API_KEY", "api/worker -> sandbox (CODE_EXECUTION_API_KEY)", always),
    SecretSpec("PLUGIN_DAEMON_KEY", "api -> plugin daemon (the daemon's SERVER_KEY)", always),
    SecretSpec("PLUGIN_DIFY_INNER_API_KEY", "plugin daemon -> api inner API", always),
    SecretSpec("DIFY_AGENT_SERVER_SECRET_KEY", "the agent backend's root secret (Agent Stub "
               "tokens)", runs_agent, shape=base64url_32),
    SecretSpec("DIFY_AGENT_API_TOKEN", "api/worker -> agent backend (AGENT_BACKEND_API_TOKEN)",
               runs_agent),
    SecretSpec("DIFY_AGENT_SHELLCTL_AUTH_TOKEN", "agent backend -> local sandbox (shellctl)",
               runs_agent),
    SecretSpec("WEAVIATE_API_KEY", "Weaviate API-key authentication",
               lambda inv: inv.settings.vector.store == "weaviate"),
    SecretSpec("PGVECTOR_PASSWORD", "the pgvector role Dify's PGVECTOR_USER names",
               lambda inv: inv.settings.vector.store == "pgvector"),
    SecretSpec("GRAFANA_ADMIN_PASSWORD", "Grafana's admin user",
               lambda inv: bool(inv.with_role("monitor"))),
    SecretSpec("MONITOR_DB_PASSWORD", "the PostgreSQL role of the metrics exporter (pg_monitor)",
               lambda inv: bool(inv.with_role("monitor") and inv.with_role("db_primary"))),
    SecretSpec("ELASTIC_PASSWORD", "Elasticsearch's superuser `elastic` (logging tier)",
               lambda inv: bool(inv.with_role("logging"))),
    SecretSpec("KIBANA_SYSTEM_PASSWORD", "Kibana's login to Elasticsearch (kibana_system)",
               lambda inv: bool(inv.with_role("logging")) and inv.settings.logging.kibana),
    SecretSpec("KIBANA_ENCRYPTION_KEY", "Kibana's session and saved-object encryption key",
               lambda inv: bool(inv.with_role("logging")) and inv.settings.logging.kibana),
    SecretSpec("LOGS_WRITER_PASSWORD", "the log shippers' Elasticsearch user (add documents only)",
               lambda inv: bool(inv.with_role("logging"))),
    SecretSpec("S3_ACCESS_KEY", "the S3-compatible storage",
               lambda inv: inv.settings.storage.type == "s3", generated=False),
    SecretSpec("S3_SECRET_KEY", "the S3-compatible storage",
               lambda inv: inv.settings.storage.type == "s3", generated=False),
    SecretSpec("INTERNAL_CA_KEY", "the private CA of the links inside the installation "
               "(tls.internal): every host's certificate is derived from it",
               lambda inv: inv.settings.tls.internal),
    # Generated like the rest, so backups are sealed from the first one; `inv config.secrets`
    # asks the operator to keep a copy away from this machine (BACKUP_PASSPHRASE_NOTE).
    SecretSpec("BACKUP_PASSPHRASE", "encrypts backups (keep a copy away from this machine)",
               lambda inv: inv.settings.backup.encrypt != "none"),
    SecretSpec("BACKUP_S3_ACCESS_KEY", "the bucket that receives backup copies",
               lambda inv: inv.settings.backup.copy.type == "s3", generated=False),
    SecretSpec("BACKUP_S3_SECRET_KEY", "the bucket that receives backup copies",
               lambda inv: inv.settings.backup.copy.type == "s3", generated=False),
)


BACKUP_PASSPHRASE_NOTE = ("BACKUP_PASSPHRASE seals the config and secrets part of every backup "
                          "(backup.encrypt): copy it from the secrets file to a place away from "
                          "this machine (a password manager, a vault), or the secrets in a "
                          "backup cannot be read once this machine is lost")


def needed(inventory: Inventory) -> list[SecretSpec]:
    """The secrets this inventory's layout uses."""
    return [spec for spec in SPECS if spec.needed(inventory)]


COMMAND_TIMEOUT = 60  # seconds one run of secrets.command may take
COMMAND_FIX = ("run the command yourself to see why (signed in to the vault? the item there?), "
               "then run this again")


def from_command(inventory: Inventory) -> bool:
    """Whether the secrets come from secrets.command rather than the secrets file."""
    return inventory.settings.secrets.source == "command"


def read(inventory: Inventory) -> tuple[dict[str, str], list[Problem]]:
    """The secrets' values and every problem with them (missing, weak, published; the file's
    mode; a command that failed)."""
    if from_command(inventory):
        values, problems = fetch(inventory)
        shown = f"{display(inventory.file)}: secrets.command"
    else:
        values, problems = read_file(inventory)
        shown = display(inventory.secrets_file)
        if not inventory.secrets_file.is_file():
            return values, problems
    for spec in needed(inventory):
        problem = weakness(spec, values.get(spec.name))
        if problem:
            problems.append(Problem(shown, spec.name, problem, remedy(inventory, spec, values)))
    return values, problems


def remedy(inventory: Inventory, spec: SecretSpec, values: dict[str, str]) -> str:
    """How to fix a secret that is missing or unusable, for where secrets come from."""
    if from_command(inventory):
        return (f"store a value of your own (16+ random characters) as {spec.name} where "
                f"secrets.command reads it")
    if spec.generated and spec.name not in values:
        return "run `inv config.secrets` to generate it"
    return (f"set {spec.name} to a value of your own"
            + (" (or delete the line and run `inv config.secrets`)" if spec.generated else ""))


def read_file(inventory: Inventory) -> tuple[dict[str, str], list[Problem]]:
    """The secrets file's values, and its own problems (missing, readable by others)."""
    path, shown = inventory.secrets_file, display(inventory.secrets_file)
    if not path.is_file():
        return {}, [Problem(shown, "(file)", "the secrets file does not exist",
                            "run `inv config.secrets` to generate it")]
    problems = []
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        problems.append(Problem(shown, "(file)", f"readable by others (mode {mode:04o})",
                                f"run `chmod 600 {shown}` (or `inv config.secrets`)"))
    return {key: value or "" for key, value in dotenv_values(path).items()}, problems


def fetch(inventory: Inventory) -> tuple[dict[str, str], list[Problem]]:
    """The secrets as secrets.command prints them: dotenv lines from one run, or with `{name}`
    one run per needed secret. A failure names the secret and the command's last words on
    stderr, never what it printed on stdout."""
    command = inventory.settings.secrets.command
    shown = display(inventory.file)
    if not command.strip():
        return {}, [Problem(shown, "secrets.command", "is empty, and secrets.source is command",
                            "set the command that prints the secrets (README: \"Secrets from "
                            "a vault\"), or set secrets.source to file")]
    if "{name}" not in command:
        printed, failure = run_secret_command(command)
        if failure:
            return {}, [Problem(shown, "secrets.command", failure, COMMAND_FIX)]
        return {key: value or "" for key, value in
                dotenv_values(stream=io.StringIO(printed)).items()}, []
    values, problems = {}, []
    for spec in needed(inventory):
        printed, failure = run_secret_command(command.replace("{name}", shell.quote(spec.name)))
        if failure:
            problems.append(Problem(shown, f"secrets.command ({spec.name})", failure,
                                    COMMAND_FIX))
        else:
            values[spec.name] = printed.rstrip("\r\n")
    return values, problems


def run_secret_command(command: str) -> tuple[str, str]:
    """(what the command printed, "") or ("", why it failed) for one run of secrets.command."""
    try:
        result = subprocess.run(["sh", "-c", command], capture_output=True, text=True,
                                stdin=subprocess.DEVNULL, timeout=COMMAND_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        return "", f"did not finish within {COMMAND_TIMEOUT} s"
    if result.returncode:
        said = (result.stderr.strip().splitlines() or [""])[-1][:200]
        return "", f"failed (exit {result.returncode})" + (f": {said}" if said else "")
    return result.stdout, ""


def weakness(spec: SecretSpec, value: str | None) -> str | None:
    """Why a secret's value is unusable, or None when it is fine. Never includes the value."""
    if value is None:
        return f"missing ({spec.purpose})"
    if not value.strip():
        return f"empty ({spec.purpose})"
    if value in PUBLISHED or value.lower() in PUBLISHED:
        return "is a published default or placeholder: anyone can read it"
    if not value.isprintable():
        return "holds a control character (a newline, a tab, ...)"
    if "'" in value or "\\" in value:
        return ("holds a quote (') or a backslash, which docker compose and python-dotenv read "
                "back differently from the env files Dify reads")
    if spec.generated and len(value) < MIN_LENGTH:
        return f"shorter than {MIN_LENGTH} characters"
    return spec.shape(value) if spec.shape else None


def generate(inventory: Inventory) -> list[str]:
    """Append every missing generatable secret to the file (0600); return the names written.
    With secrets from a command nothing is written here: the vault is where they go."""
    if from_command(inventory):
        return []
    path = inventory.secrets_file
    path.parent.mkdir(parents=True, exist_ok=True)
    present = dotenv_values(path) if path.is_file() else {}
    missing = [spec.name for spec in needed(inventory)
               if spec.generated and spec.name not in present]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as handle:
        if missing and path.stat().st_size and not path.read_bytes().endswith(b"\n"):
            handle.write("\n")
        for name in missing:
            handle.write(f"{name}={new_secret(name)}\n")
    os.chmod(path, 0o600)
    return missing


def new_secret(name: str) -> str:
    """A random value: URL-safe, so it can sit in a Redis or PostgreSQL URL unquoted; 32 random
    bytes as unpadded base64url, which is also what DIFY_AGENT_SERVER_SECRET_KEY must be."""
    return ("sk-" if name == "SECRET_KEY" else "") + random.token_urlsafe(42 if name ==
                                                                         "SECRET_KEY" else 32)

