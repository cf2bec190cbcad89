"""Health gates poll until they pass or the deadline passes; never a fixed sleep."""

from __future__ import annotations

import http.server
import threading

import pytest

from tasks.core.errors import GateTimeout
from tasks.core.gates import CommandGate, Gate, HttpGate, TcpGate, poll, wait
from tasks.core.inventory import Host
from tests.unit.fakes import FakeMachine

MACHINE = FakeMachine(Host(name="db1", address="10.0.3.11"))


class Scripted(Gate):
    """A gate that answers from a list."""

    def __init__(self, answers: list[bool], timeout: float) -> None:
        object.__setattr__(self, "answers", answers)
        super().__init__("postgresql", timeout=timeout, interval=1)

    def probe(self, machine):
        passed = self.answers.pop(0)
        return passed, "accepting" if passed else "no response"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.pauses: list[float] = []

    def __call__(self) -> float:
        return self.now

    def pause(self, seconds: float) -> None:
        self.pauses.append(seconds)
        self.now += seconds


def test_passes_after_a_few_probes() -> None:
    clock = Clock()
    assert wait(Scripted([False, False, True], 10), MACHINE, clock=clock,
                pause=clock.pause) == "accepting"
    assert clock.pauses == [1, 1]


def test_timeout_names_component_host_and_last_answer() -> None:
    clock = Clock()
    with pytest.raises(GateTimeout) as caught:
        wait(Scripted([False] * 10, 3), MACHINE, clock=clock, pause=clock.pause)
    assert str(caught.value) == ("postgresql on db1 (root@10.0.3.11:22) not healthy after 3 s; "
                                 "last answer: no response")


def test_poll_returns_the_last_answer_and_cuts_its_last_pause_at_the_deadline() -> None:
    clock = Clock()
    answers = iter(range(10))
    assert poll(lambda: (False, next(answers)), 2.5, 1, clock=clock, pause=clock.pause) \
        == (False, 3)
    assert clock.pauses == [1, 1, 0.5]
    clock = Clock()
    assert poll(lambda: (True, "at once"), 0, 1, clock=clock, pause=clock.pause) \
        == (True, "at once")  # always one try, even with no time left
    assert clock.pauses == []


def test_http_and_tcp_gates_against_a_real_server() -> None:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b'{"status": "ok"}' if self.path == "/health" else \
                b"missing: 'x'\n\x1b[2J  \"y\""
            self.send_response(200 if self.path == "/health" else 404)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        good = HttpGate("api", url=f"http://127.0.0.1:{port}/health", contains='"ok"')
        assert good.probe(MACHINE)[0] is True
        bad = HttpGate("api", url=f"http://127.0.0.1:{port}/other")
        passed, answer = bad.probe(MACHINE)
        assert (passed, answer) == (False, "HTTP 404: missing: 'x' ?[2J \"y\"")
        assert TcpGate("api", address="127.0.0.1", port=port).probe(MACHINE)[0] is True
    finally:
        server.shutdown()
        server.server_close()
    assert TcpGate("api", address="127.0.0.1", port=port).probe(MACHINE)[0] is False


def test_a_command_gate_gives_each_run_its_probe_timeout() -> None:
    """Five intervals (at least 10 s) per run, unless the gate says how long one run may take."""
    seen: list[float] = []

    class Recording(FakeMachine):
        def run(self, command, *, timeout=None, **kwargs):
            seen.append(timeout)
            return super().run(command, timeout=timeout, **kwargs)

    machine = Recording(Host(name="vm", address="10.0.3.12"))
    CommandGate("worker", interval=1, command="check").probe(machine)
    CommandGate("worker", interval=4, command="check").probe(machine)
    CommandGate("worker", interval=2, probe_timeout=120, command="check").probe(machine)
    assert seen == [10, 20, 120]
