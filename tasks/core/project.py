"""Where the project's own files live and how the inventory and secrets files are chosen."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = ROOT / "config"
INVENTORY_DIR = CONFIG_DIR / "inventories"
PROFILE_DIR = CONFIG_DIR / "profiles"
DEFAULTS_FILE = CONFIG_DIR / "defaults.yml"
DEFAULT_INVENTORY = INVENTORY_DIR / "local.yml"
SECRETS_DIR = ROOT / ".secrets"


def inventory_path(explicit: str | None = None) -> Path:
    """The inventory to use: a flag, else DIFY_INVENTORY, else the default local inventory."""
    chosen = explicit or os.environ.get("DIFY_INVENTORY")
    return Path(chosen).expanduser().resolve() if chosen else DEFAULT_INVENTORY


def default_secrets_path(name: str) -> Path:
    """Secrets of an inventory live outside version control, one file per inventory name."""
    chosen = os.environ.get("DIFY_SECRETS")
    return Path(chosen).expanduser().resolve() if chosen else SECRETS_DIR / f"{name}.env"


def display(path: Path) -> str:
    """A path as the operator should see it: relative to the project when inside it."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)
