"""Hooks: how one tier's verb calls into another tier that may or may not be there.

A tier that offers a service registers a function under a well-known name when its module is
imported (tasks.py imports every namespace module, so under `inv` all of them are registered);
a verb that wants the service looks it up at run time and says what it does when nobody offers
it. Known names and their signatures:

- ``backup.database``: ``(inventory, reason: str) -> str``: take a backup of the Dify databases
  now and return its identifier (what `inv backup.restore` needs to bring it back).
- ``lb.drain`` / ``lb.undrain``: ``(inventory, host_name: str) -> None``: take an app host out of
  every load balancer's upstreams (in-flight requests finish first) / put it back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_HOOKS: dict[str, Callable[..., Any]] = {}


def register(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """Offer a function under a hook name (the last registration wins); returns the function."""
    _HOOKS[name] = function
    return function


def lookup(name: str) -> Callable[..., Any] | None:
    """The function registered under the name, or None when no tier offers it."""
    return _HOOKS.get(name)


def unregister(name: str) -> None:
    """Withdraw a hook (tests)."""
    _HOOKS.pop(name, None)
