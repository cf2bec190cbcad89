"""app.logs without hosts (tasks/tiers/app_logs.py): which sources, the exact compose command,
the merge in time order, the filter, and a stream's lines prefixed as they come."""

from __future__ import annotations

import pytest

from tasks.core.errors import DifyopsError, InputError
from tasks.core.hosts import Result
from tasks.tiers import app_logs
from tests.unit.fakes import FakeMachine

COMPOSE = "docker compose --project-directory /opt/dify -p dify"


def test_sources_are_every_service_of_every_app_host_or_those_asked_for(load, base) -> None:
    inventory = load(base)
    every = [(s.host.name, s.service) for s in app_logs.sources(inventory)]
    assert ("api1", "api") in every and ("api2", "api") in every
    assert ("worker1", "worker_beat") in every and ("web1", "web") in every
    assert {h for h, _ in every} == {"web1", "api1", "api2", "worker1"}
    assert [(s.host.name, s.service) for s in app_logs.sources(inventory, "api")] == [
        ("api1", "api"), ("api2", "api")]
    assert [s.service for s in app_logs.sources(inventory, host="api2")] == [
        s for h, s in every if h == "api2"]
    with pytest.raises(InputError, match="the service 'api' does not run on worker1"):
        app_logs.sources(inventory, "api", "worker1")
    with pytest.raises(InputError, match="no app service runs on db1"):
        app_logs.sources(inventory, host="db1")


def test_the_command_reads_one_service_with_docker_s_timestamps(load, base) -> None:
    inventory = load(base)
    assert app_logs.logs_command(inventory, "api", "10m", follow=False) == (
        f"{COMPOSE} logs --no-color --no-log-prefix --timestamps --since 10m api")
    assert app_logs.logs_command(inventory, "worker_all", "2026-12-07T09:00:00Z",
                                 follow=True) == (
        f"{COMPOSE} logs --no-color --no-log-prefix --timestamps --since "
        "2026-12-07T09:00:00Z --follow worker_all")
    assert app_logs.logs_command(inventory, "web", "", follow=False).endswith("--timestamps web")


@pytest.mark.parametrize("since", ["10 m", "yesterday", "10m; reboot", "$(id)", "1d"])
def test_a_since_docker_would_not_take_is_refused(load, base, since) -> None:
    with pytest.raises(InputError, match=r"--since: .* is neither a duration nor a date"):
        app_logs.logs_command(load(base), "api", since, follow=False)


def test_lines_are_merged_in_time_order_prefixed_and_filtered(load, base) -> None:
    inventory = load(base)
    api1, api2 = app_logs.sources(inventory, "api")
    answers = [(api1, "2026-12-07T01:00:02.000000001Z GET /a\n"
                      "2026-12-07T01:00:04.000000000Z boom: timeout\n"),
               (api2, "2026-12-07T01:00:01.500000000Z boot\n"
                      "2026-12-07T01:00:03.000000000Z boom: refused\n")]
    assert app_logs.merged(answers) == [
        "api2 api | 2026-12-07T01:00:01.500000000Z boot",
        "api1 api | 2026-12-07T01:00:02.000000001Z GET /a",
        "api2 api | 2026-12-07T01:00:03.000000000Z boom: refused",
        "api1 api | 2026-12-07T01:00:04.000000000Z boom: timeout"]
    assert app_logs.merged(answers, grep="boom") == [
        "api2 api | 2026-12-07T01:00:03.000000000Z boom: refused",
        "api1 api | 2026-12-07T01:00:04.000000000Z boom: timeout"]
    assert app_logs.merged(answers, grep="2026") == []  # the text, not the timestamp


class LoggingHost(FakeMachine):
    """Answers a logs command with one line naming the host and the service (api2 refuses
    when told to fail)."""

    fail = False

    def _execute(self, command: str, timeout: float) -> Result:
        self.commands.append(command)
        if self.host.name == "api2" and self.fail:
            return Result(1, "", "permission denied")
        stamp = {"api1": "01", "api2": "00"}[self.host.name]
        return Result(0, f"2026-12-07T01:00:{stamp}.0Z {self.host.name} {command.split()[-1]}\n",
                      "")


def test_read_asks_each_host_for_its_services_and_merges(load, base, use_machines) -> None:
    inventory = load(base)
    made: dict[str, LoggingHost] = {}
    use_machines(lambda host, timeouts=None: made.setdefault(host.name, LoggingHost(host)))
    lines = app_logs.read(inventory, app_logs.sources(inventory, "api"), "5m", "")
    assert lines == ["api2 api | 2026-12-07T01:00:00.0Z api2 api",
                     "api1 api | 2026-12-07T01:00:01.0Z api1 api"]
    assert made["api1"].commands == [f"{COMPOSE} logs --no-color --no-log-prefix --timestamps "
                                     "--since 5m api"]
    made["api2"].fail = True
    with pytest.raises(DifyopsError, match=r"cannot read the logs of api2: .*permission"):
        app_logs.read(inventory, app_logs.sources(inventory, "api"), "5m", "")


def test_a_stream_writes_whole_lines_prefixed_and_filtered() -> None:
    seen: list[str] = []
    stream = app_logs.PrefixedLines("api1 api |", "boom", seen.append)
    stream.write("2026-12-07T01:00:00Z boom one\r\n2026-12-07T01:00:01Z quiet\r\n2026-12")
    assert seen == ["api1 api | 2026-12-07T01:00:00Z boom one"]
    stream.write("-07T01:00:02Z boom two\r\n")
    assert seen[-1] == "api1 api | 2026-12-07T01:00:02Z boom two" and len(seen) == 2
