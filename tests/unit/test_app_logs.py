"""app.logs without hosts (tasks/tiers/app_logs.py): which sources, the exact compose and
journalctl commands, the merge in time order, the filter, and a stream's lines prefixed as they
come."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.core.errors import DifyopsError, InputError
from tasks.core.hosts import Result
from tasks.core.inventory import Inventory, load_inventory
from tasks.tiers import app_logs
from tests.unit.fakes import FakeMachine

COMPOSE = "docker compose --project-directory /opt/dify -p dify"
HOMELAB = Path(__file__).resolve().parents[2] / "config" / "inventories" / "homelab.yml"
JOURNAL = ("SYSTEMD_COLORS=0 journalctl --no-pager --output json --output-fields MESSAGE --unit "
           "dify-api-dev.service")


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
    api = app_logs.sources(inventory, "api")[0]
    assert app_logs.logs_command(inventory, api, "10m", follow=False) == (
        f"{COMPOSE} logs --no-color --no-log-prefix --timestamps --since 10m api")
    worker = app_logs.Source(api.host, "worker_all")
    assert app_logs.logs_command(inventory, worker, "2026-12-07T09:00:00Z", follow=True) == (
        f"{COMPOSE} logs --no-color --no-log-prefix --timestamps --since "
        "2026-12-07T09:00:00Z --follow worker_all")
    assert app_logs.logs_command(inventory, app_logs.sources(inventory, "web")[0], "",
                                 follow=False).endswith("--timestamps web")


@pytest.mark.parametrize("since", ["10 m", "yesterday", "10m; reboot", "$(id)", "1d"])
def test_a_since_docker_would_not_take_is_refused(load, base, since) -> None:
    inventory = load(base)
    for source in (app_logs.sources(inventory, "api")[0], homelab_sources()[0]):
        with pytest.raises(InputError, match=r"--since: .* is neither a duration nor a date"):
            app_logs.logs_command(inventory, source, since, follow=False)


def homelab_sources(service: str = "") -> list[app_logs.Source]:
    return app_logs.sources(homelab(), service)


def homelab() -> Inventory:
    return load_inventory(HOMELAB, check_secrets=False)


def test_the_home_lab_s_units_are_sources_and_its_windows_front_end_is_named_unread() -> None:
    inventory = homelab()
    assert [(s.host.name, s.service, s.unit) for s in app_logs.sources(inventory)] == [
        ("ubuntu-vm", "api", "dify-api-dev.service"),
        ("ubuntu-vm", "worker", "dify-worker-dev.service")]
    assert app_logs.unread(inventory) == [
        "windows: not read (a Windows workstation's dev server writes its output to "
        "C:\\ProgramData\\difyops\\dify-web-dev.log there)"]
    assert app_logs.unread(inventory, "api") == []
    with pytest.raises(InputError, match="the service 'web' does not run on any host"):
        app_logs.sources(inventory, "web")


@pytest.mark.parametrize(("since", "journal"), [
    ("10m", "-10m"), ("1h30m", "-1h30m"), ("2026-12-07T09:00:00Z", "@1796634000"),
    ("2026-12-07T10:00:00+01:00", "@1796634000"), ("2026-12-07", "'2026-12-07 00:00:00'"),
    ("2026-12-07T09:30", "'2026-12-07 09:30:00'")])
def test_a_unit_is_read_by_journalctl_in_json_from_the_same_moment(since, journal) -> None:
    api = homelab_sources("api")[0]
    assert app_logs.logs_command(homelab(), api, since, follow=False) == (
        f"{JOURNAL} --since {journal}")
    assert app_logs.logs_command(homelab(), api, "", follow=True) == f"{JOURNAL} --follow"


def journal_line(micros: int, message: object) -> str:
    return json.dumps({"__CURSOR": "s=1", "__REALTIME_TIMESTAMP": str(micros),
                       "_BOOT_ID": "b", "MESSAGE": message})


def test_journal_and_docker_lines_merge_in_time_order_whatever_their_digits(load, base) -> None:
    api = app_logs.sources(load(base), "api")[0]
    worker = homelab_sources("worker")[0]
    at_noon = 1796644800_000000  # 2026-12-07T12:00:00Z
    answers = [(api, "2026-12-07T12:00:00.5Z half\n2026-12-07T12:00:01Z one\n"),
               (worker, "-- No entries --\n"
                        + journal_line(at_noon + 250_000, "quarter") + "\n"
                        + journal_line(at_noon + 750_000, [104, 105, 255]) + "\n")]
    assert app_logs.merged(answers) == [
        "ubuntu-vm worker | 2026-12-07T12:00:00.250000Z quarter",
        "api1 api | 2026-12-07T12:00:00.5Z half",
        "ubuntu-vm worker | 2026-12-07T12:00:00.750000Z hi\ufffd",
        "api1 api | 2026-12-07T12:00:01Z one"]
    assert app_logs.merged(answers, grep="quarter") == [
        "ubuntu-vm worker | 2026-12-07T12:00:00.250000Z quarter"]


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


def test_a_stream_writes_whole_lines_prefixed_and_filtered(load, base) -> None:
    seen: list[str] = []
    stream = app_logs.PrefixedLines(app_logs.sources(load(base), "api")[0], "boom", seen.append)
    stream.write("2026-12-07T01:00:00Z boom one\r\n2026-12-07T01:00:01Z quiet\r\n2026-12")
    assert seen == ["api1 api | 2026-12-07T01:00:00Z boom one"]
    stream.write("-07T01:00:02Z boom two\r\n")
    assert seen[-1] == "api1 api | 2026-12-07T01:00:02Z boom two" and len(seen) == 2


def test_a_followed_unit_s_json_becomes_prefixed_lines() -> None:
    seen: list[str] = []
    stream = app_logs.PrefixedLines(homelab_sources("api")[0], "", seen.append)
    line = journal_line(1796644800_000001, "GET /health 200")
    stream.write(line[:20])
    assert seen == []
    stream.write(line[20:] + "\r\n")
    assert seen == ["ubuntu-vm api | 2026-12-07T12:00:00.000001Z GET /health 200"]
