"""each_host: per-host outcomes in inventory order; a failing host does not stop the others."""

from __future__ import annotations

from tasks.core import fleet
from tasks.core.errors import HostError
from tasks.core.inventory import Host
from tests.unit.fakes import FakeMachine


def test_outcomes_in_order_with_errors_kept(use_machines) -> None:
    hosts = [Host(name=n, address=f"10.0.0.{i}") for i, n in enumerate(["a", "b", "c"], 1)]
    use_machines(lambda host, timeouts=None: FakeMachine(host))

    def action(machine: FakeMachine) -> str:
        if machine.host.name == "b":
            raise HostError("b is down")
        return machine.host.address

    outcomes = fleet.each_host(hosts, action)
    assert [(o.host.name, o.value, o.error) for o in outcomes] == [
        ("a", "10.0.0.1", ""), ("b", None, "b is down"), ("c", "10.0.0.3", "")]


def test_table_aligns_columns() -> None:
    assert fleet.table(["host", "role", "lag"], [["db1", "primary", "-"],
                                                 ["db22", "standby", "0 B"]]) == (
        "host  role     lag\n"
        "db1   primary  -\n"
        "db22  standby  0 B")
