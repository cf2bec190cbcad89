"""A plan is data: per tier and host, the files to write, the commands to run, the gates to pass.

Tiers build plans; the executor (tasks/core/apply.py) dry-runs or applies them. Nothing in a
plan touches a host by itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tasks.core.facts import Holds
from tasks.core.gates import Gate
from tasks.core.inventory import Host


@dataclass(frozen=True)
class WriteFile:
    """Make a file on the host exactly this content, mode and ownership."""

    path: str
    content: str
    mode: int = 0o644
    owner: str = "root"
    group: str = "root"
    secret: bool = False  # content never shown in diffs or logs

    @property
    def label(self) -> str:
        """How progress lines name the step."""
        return f"file {self.path}"


@dataclass(frozen=True)
class RunCommand:
    """A command that converges the host, run only when needed.

    `unless`: a read-only probe; when it exits 0 the command is not needed. Or a `Holds`: a typed
    fact read from the host and decided on in Python (tasks/core/facts.py).
    `on_change`: paths of files in the same plan; the command runs only when one of them changed
    (also in an earlier run that failed before the command ran: the executor leaves a marker).
    `changes`: False for a command that only verifies (e.g. `nginx -t`): run every time, never
    counted as a change.
    """

    name: str
    command: str
    unless: str | Holds | None = None
    on_change: tuple[str, ...] = ()
    changes: bool = True

    @property
    def label(self) -> str:
        """How progress lines name the step (never the command: it may hold a secret)."""
        return self.name

    @property
    def probe(self) -> str:
        """The read-only command that answers `unless` ("" without one)."""
        if isinstance(self.unless, Holds):
            return self.unless.fact.command
        return self.unless or ""


@dataclass(frozen=True)
class Restart:
    """How to restart the component a gate checks (used by deploy.doctor, never by a deploy).

    `what` names the component (a systemd unit, a compose service): restarts are counted per
    host and `what`, and gates sharing one `what` get one restart between them.
    """

    what: str
    command: str


@dataclass(frozen=True)
class WaitFor:
    """Poll a health gate until it passes or its deadline runs out.

    `restart`: how deploy.doctor may bring the component back when the gate fails; None for
    gates that check something the host does not run itself (a peer, replication, a quorum).
    """

    gate: Gate
    restart: Restart | None = None

    @property
    def label(self) -> str:
        """How progress lines name the step."""
        return f"health {self.gate.name}"


Step = WriteFile | RunCommand | WaitFor


@dataclass
class HostPlan:
    """The ordered steps for one host in one tier."""

    host: Host
    steps: list[Step] = field(default_factory=list)

    def files(self) -> list[WriteFile]:
        """The files this host gets."""
        return [step for step in self.steps if isinstance(step, WriteFile)]


@dataclass
class TierPlan:
    """One tier's work: the hosts in parallel (or one at a time when serial)."""

    tier: str
    hosts: list[HostPlan]
    depends_on: tuple[str, ...] = ()
    serial: bool = False
