"""A packet capture of a lab's network: tcpdump on its bridge, on the machine that runs the lab,
so every packet between two lab hosts (and between this machine and them) is recorded. SSH is
left out: it is encrypted by construction and carries the images, which would fill the file.
What the capture is for: looking for secrets that cross the network in clear."""

from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path
from urllib.parse import quote

from tasks.core.gates import poll

FILTER = "not port 22"


class Capture:
    """tcpdump writing one file, from start() to stop()."""

    def __init__(self, interface: str, path: Path) -> None:
        self.interface = interface
        self.path = path
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 10) -> None:
        """Start tcpdump and wait until it writes its file."""
        # --immediate-mode and -U: each packet is read and written as it comes (not a second
        # later, in a block); -s 0: whole packets; -Z root: no user switch, so the file stays
        # where pytest put it. Its messages go to a file beside it.
        messages = self.path.with_suffix(".log")
        with messages.open("wb") as log:
            self.process = subprocess.Popen(
                ["tcpdump", "-i", self.interface, "--immediate-mode", "-U", "-s", "0",
                 "-Z", "root", "-w", str(self.path), FILTER],
                stdout=subprocess.DEVNULL, stderr=log)
        listening, _ = poll(lambda: (self.path.exists() or self.process.poll() is not None,
                                     None), timeout, 0.1)
        if not listening or self.process.poll() is not None:
            raise RuntimeError(f"tcpdump on {self.interface} did not start: "
                               f"{messages.read_text(errors='replace').strip()}")

    def stop(self, timeout: float = 30) -> None:
        """Stop tcpdump (SIGINT: it writes what it buffered and exits)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            self.process.wait(timeout)

    def count(self, marker: str) -> int:
        """How many times a text occurs in the packets recorded so far."""
        return self.path.read_bytes().count(marker.encode())

    def found(self, values: dict[str, str]) -> set[str]:
        """The names of the values that occur in a captured packet, as they are or
        percent-encoded (in a URL)."""
        data = self.path.read_bytes()
        return {name for name, value in values.items() if value and any(
            form.encode() in data for form in {value, quote(value, safe="")})}


def start(interface: str, path: Path) -> Capture | None:
    """A capture started on the interface; None where tcpdump is not installed (scripts/setup
    installs it): the test that reads it is then skipped, saying so."""
    if shutil.which("tcpdump") is None:
        return None
    capture = Capture(interface, path)
    capture.start()
    return capture
