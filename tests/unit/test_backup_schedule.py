"""backup.schedule: rendered timer, service, cron line and the wrapper that reports failures."""

from __future__ import annotations

import configparser
import io
import json
import os
import subprocess
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest

from tasks.backups import schedule
from tasks.core import facts
from tasks.core.apply import Executor
from tasks.core.inventory import Host, Inventory
from tasks.core.plan import RunCommand, WriteFile
from tasks.core.render import Renderer
from tasks.core.report import CHANGED, Report
from tasks.core.schedule import CONTROL
from tests.unit.fakes import FakeMachine


def unit(text: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string(text)
    return parser


def files(inventory: Inventory, *, cron: bool) -> dict[str, WriteFile]:
    steps = schedule.steps(inventory, Renderer(inventory), CONTROL, cron=cron)
    return {step.path: step for step in steps if isinstance(step, WriteFile)}


def test_systemd_timer_and_service(load: Callable[..., Inventory], base: dict) -> None:
    base["backup"] = {"time": "02:30", "dir": "/srv/backups"}
    rendered = files(load(base), cron=False)
    wrapper = "/usr/local/sbin/difyops-backup-unit"
    timer = unit(rendered["/etc/systemd/system/difyops-backup-unit.timer"].content)
    assert timer["Timer"]["OnCalendar"] == "*-*-* 02:30:00"
    assert timer["Timer"]["Persistent"] == "true"
    assert timer["Timer"]["Unit"] == "difyops-backup-unit.service"
    assert timer["Install"]["WantedBy"] == "timers.target"
    service = unit(rendered["/etc/systemd/system/difyops-backup-unit.service"].content)
    assert service["Service"]["Type"] == "oneshot"
    assert service["Service"]["ExecStart"] == wrapper
    step = rendered[wrapper]
    assert (step.mode, step.secret) == (0o700, True)
    assert "-m invoke backup.run backup.prune" in step.content
    assert "LOG=/srv/backups/backup.log" in step.content


def test_cron_line(load: Callable[..., Inventory], base: dict) -> None:
    base["backup"] = {"time": "03:05"}
    rendered = files(load(base), cron=True)
    assert "/etc/systemd/system/difyops-backup-unit.timer" not in rendered
    cron = rendered["/etc/cron.d/difyops-backup-unit"]
    assert cron.mode == 0o644
    lines = [line for line in cron.content.splitlines()
             if line and not line.startswith("#") and "=" not in line]
    assert lines == ["5 3 * * * root /usr/local/sbin/difyops-backup-unit"]
    assert cron.content.endswith("\n")  # cron ignores a last line without newline
    assert schedule.cron_line(load(base)) == "5 3 * * * /usr/local/sbin/difyops-backup-unit"


def test_unit_names_are_safe_for_cron_d(load: Callable[..., Inventory], base: dict) -> None:
    base["name"] = "prod-eu-2"
    assert schedule.unit_name(load(base)) == "difyops-backup-prod-eu-2"


class SystemdHost(FakeMachine):
    """Answers the facts of units and paths from the state the commands leave behind."""

    def __init__(self, host: Host) -> None:
        self.enabled = False
        super().__init__(host, answers=self.answer)

    def answer(self, command: str) -> int:
        if "systemctl enable --now" in command:
            self.enabled = True
        return 0

    def output(self, command: str) -> str:
        if "systemctl show" in command:
            return ("ActiveState=active\nUnitFileState=enabled\n" if self.enabled else
                    "ActiveState=inactive\nUnitFileState=disabled\n")
        if "stat -c" in command:
            return "missing\n"  # no cron file
        return ""


def test_schedule_applies_once_then_changes_nothing(load: Callable[..., Inventory],
                                                    base: dict) -> None:
    inventory = load(base)
    machine = SystemdHost(CONTROL)

    def apply() -> Report:
        executor = Executor(Report(out=io.StringIO()))
        executor.machines[CONTROL.name] = machine
        return executor.run(schedule.plan(inventory, CONTROL, cron=False))

    first = apply()
    assert first.failed == []
    assert first.count(CHANGED) == 6  # 3 files, daemon-reload, enable, restart
    assert any(c.endswith("systemctl enable --now difyops-backup-unit.timer")
               for c in machine.commands)
    machine.commands.clear()
    second = apply()
    assert second.count(CHANGED) == 0
    assert not any(verb in c for c in machine.commands
                   for verb in ("systemctl enable", "systemctl daemon-reload", "systemctl restart",
                                "systemctl reset-failed"))


def test_without_cron_or_systemd_only_the_script(load: Callable[..., Inventory],
                                                 base: dict) -> None:
    steps = schedule.steps(load(base), Renderer(load(base)), CONTROL, cron=True,
                           wrapper_only=True)
    assert [s.path for s in steps if isinstance(s, WriteFile)] == [
        "/usr/local/sbin/difyops-backup-unit"]
    assert len(steps) == 1


def test_switching_to_cron_disables_the_timer(load: Callable[..., Inventory],
                                              base: dict) -> None:
    steps = schedule.steps(load(base), Renderer(load(base)), CONTROL, cron=True)
    disable = [s for s in steps if isinstance(s, RunCommand)]
    assert [s.command for s in disable] == ["systemctl disable --now difyops-backup-unit.timer"]
    assert disable[0].probe == ("if [ -d /run/systemd/system ]; then systemctl show -p "
                                "ActiveState -p UnitFileState difyops-backup-unit.timer; "
                                "else echo 'no systemd'; fi")
    assert disable[0].unless.test(facts.unit_state("ActiveState=inactive\n"
                                                   "UnitFileState=disabled\n"))
    assert not disable[0].unless.test(facts.unit_state("ActiveState=active\n"
                                                       "UnitFileState=enabled\n"))


# --- the wrapper script, run for real with a stand-in for `python -m invoke` ---------------


@pytest.fixture
def webhook() -> Iterator[list[dict[str, Any]]]:
    """A webhook on 127.0.0.1 that records the JSON bodies POSTed to it."""
    received: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers["Content-Length"])
            received.append(json.loads(self.rfile.read(length)))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    received.append({"url": f"http://127.0.0.1:{server.server_port}/hook"})
    try:
        yield received
    finally:
        server.shutdown()
        server.server_close()


def wrapper(load: Callable[..., Inventory], base: dict, tmp_path: Path, exit_code: int,
            url: str) -> tuple[subprocess.CompletedProcess, Path]:
    base["monitor"] = {"alert_webhook": url}
    inventory = load(base)
    fake_python = tmp_path / "python"
    failing = ("#!/bin/sh\necho \"ran: $* with $DIFY_INVENTORY\"\n"
               f"echo 'error: backup failed: \"pg_dump\" said no' >&2\nexit {exit_code}\n")
    fake_python.write_text(failing if exit_code else "#!/bin/sh\necho \"ran: $*\"\n")
    fake_python.chmod(0o755)
    values = {**schedule.context(inventory), "python": str(fake_python),
              "log": str(tmp_path / "logs" / "backup.log")}
    script = tmp_path / "difyops-backup"
    script.write_text(Renderer(inventory).render("backup/difyops-backup.sh.j2", None, **values))
    result = subprocess.run(["sh", str(script)], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PATH": os.environ["PATH"]}, check=False)
    return result, tmp_path / "logs" / "backup.log"


def test_wrapper_success_logs_and_posts_nothing(load, base, tmp_path, webhook) -> None:
    result, log = wrapper(load, base, tmp_path, 0, webhook[0]["url"])
    assert result.returncode == 0, result.stderr
    text = log.read_text()
    assert "ran: -m invoke backup.run backup.prune" in text
    assert text.rstrip().endswith("difyops-backup-unit: ok")
    assert webhook[1:] == []


def test_wrapper_failure_exits_non_zero_logs_and_posts(load, base, tmp_path, webhook) -> None:
    result, log = wrapper(load, base, tmp_path, 3, webhook[0]["url"])
    assert result.returncode == 3
    text = log.read_text()
    assert "difyops-backup-unit FAILED (exit 3)" in text
    assert "difyops-backup-unit FAILED (exit 3)" in result.stderr  # the journal / cron mail
    assert len(webhook) == 2
    message = webhook[1]["text"]
    assert "difyops-backup-unit FAILED (exit 3)" in message
    assert 'error: backup failed: "pg_dump" said no' in message  # quotes survive the JSON


def test_wrapper_without_webhook_still_fails_loudly(load, base, tmp_path) -> None:
    result, log = wrapper(load, base, tmp_path, 1, "")
    assert result.returncode == 1
    assert "FAILED (exit 1)" in log.read_text() and "FAILED (exit 1)" in result.stderr


def test_wrapper_reports_an_unreachable_webhook(load, base, tmp_path) -> None:
    result, log = wrapper(load, base, tmp_path, 2, "http://127.0.0.1:9/closed")
    assert result.returncode == 2
    assert "could not POST the alert to the webhook" in log.read_text()
