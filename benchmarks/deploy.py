"""Benchmark: the first `inv deploy.all` of a whole stack, hosts in parallel against one host at a
time, and the no-op second run as a fraction of the first. Prints figures only.

Each figure comes from a fresh lab of the layout the integration test deploys
(tests/integration/stack_lab.py: lb + monitor, two api/web hosts, a worker/beat host, PostgreSQL
primary + Redis and a standby): the same inventory, deployed from nothing with
`inv deploy.all` (hosts of a tier in parallel) or `inv deploy.all --parallel 1` (one host after
the other, image shipping included). Then `inv deploy.all` again on the same hosts: nothing to
change. Times include the preflight, shipping the images (the real api image of the newest
release that runs here, stand-ins for web and the plugin daemon) and every tier's health gates.

Runs on container hosts of the test lab (needs the Docker engine, like the integration tests).
Run: python benchmarks/deploy.py [--modes parallel,serial]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.integration import stack_lab  # noqa: E402
from tests.integration.lab import Lab  # noqa: E402

MODES = {"parallel": (), "serial": ("--parallel", "1")}


def timed(stack: stack_lab.Stack, *args: str) -> float:
    """Seconds `inv deploy.all ARGS` took; stops the benchmark when it fails."""
    started = time.monotonic()
    result = stack.inv("deploy.all", *args, timeout=3600)
    seconds = time.monotonic() - started
    if result.returncode:
        raise SystemExit(f"inv deploy.all {' '.join(args)} failed after {seconds:.0f} s:\n"
                         f"{result.stdout[-4000:]}{result.stderr[-2000:]}")
    return seconds


def measure(lab: Lab, folder: Path, mode: str) -> tuple[str, float, float]:
    """(Dify version, first deploy, second deploy) on a fresh lab, in seconds."""
    folder.mkdir(parents=True)
    stack = stack_lab.start(lab, folder, prefix=f"b{mode[0]}-")
    try:
        first = timed(stack, *MODES[mode])
        print(f"  {mode}: first deploy.all {first:.1f} s", flush=True)
        second = timed(stack, *MODES[mode])
        print(f"  {mode}: second deploy.all {second:.1f} s", flush=True)
    finally:
        for host in stack.hosts.values():
            host.remove()
            lab.hosts.pop(host.name, None)
    return stack.version, first, second


def main() -> None:
    """Measure and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="parallel,serial",
                        help="comma-separated: parallel (the default deploy), serial "
                             "(--parallel 1)")
    modes = [m.strip() for m in parser.parse_args().modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"unknown mode(s) {', '.join(unknown)}: use {', '.join(MODES)}")
    figures = {}
    with Lab() as lab, tempfile.TemporaryDirectory() as scratch:
        for mode in modes:
            figures[mode] = measure(lab, Path(scratch) / mode, mode)
    hosts = len(stack_lab.LAYOUT)
    versions = " and ".join(sorted({version for version, *_ in figures.values()}))
    print(f"\nwhole stack, {hosts} hosts, the real api of Dify {versions}, from nothing:")
    for mode, (_, first, second) in figures.items():
        label = "hosts of a tier in parallel" if mode == "parallel" else "one host at a time"
        print(f"  first deploy.all, {label:28} {first:7.1f} s   second (no change) "
              f"{second:6.1f} s = {second / first:.0%} of the first")
    if {"parallel", "serial"} <= figures.keys():
        print(f"  one host at a time takes {figures['serial'][1] / figures['parallel'][1]:.2f}x "
              f"the parallel deploy")


if __name__ == "__main__":
    main()
