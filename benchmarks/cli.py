"""Benchmark: how fast the command line feels. Prints figures; asserts nothing.

- `inv --list` start-up, side by side with a baseline: Invoke listing a one-task tasks.py (the
  floor any Invoke project pays). Target: under 0.5 s.
- `inv config.check` on production.yml (13 hosts) side by side with local.yml (1 host).

Run: python benchmarks/cli.py [--runs N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(command: list[str], cwd: Path, env: dict[str, str], runs: int) -> float:
    """Median wall time of a command over several runs (it must succeed)."""
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, cwd=cwd, env={**os.environ, **env}, check=True,
                       capture_output=True)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    """Measure and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="runs per measurement (median)")
    runs = parser.parse_args().runs
    inv = [sys.executable, "-m", "invoke"]
    with tempfile.TemporaryDirectory() as scratch:
        baseline_dir = Path(scratch)
        (baseline_dir / "tasks.py").write_text(
            "from invoke import task\n\n@task\ndef hello(c):\n    \"\"\"Say hello.\"\"\"\n")
        baseline = timed([*inv, "--list"], baseline_dir, {}, runs)
        listing = timed([*inv, "--list"], ROOT, {}, runs)
        secrets = {name: str(Path(scratch) / f"{name}.env") for name in ("local", "production")}
        checks = {}
        for name, path in secrets.items():
            env = {"DIFY_INVENTORY": str(ROOT / "config" / "inventories" / f"{name}.yml"),
                   "DIFY_SECRETS": path}
            subprocess.run([*inv, "config.secrets"], cwd=ROOT, env={**os.environ, **env},
                           check=True, capture_output=True)
            checks[name] = timed([*inv, "config.check"], ROOT, env, max(3, runs // 2))
    print(f"inv --list               difyops {listing:.3f} s   baseline (one-task Invoke "
          f"project) {baseline:.3f} s   ratio {listing / baseline:.2f}   target < 0.5 s: "
          f"{'met' if listing < 0.5 else 'NOT met'}")
    print(f"inv config.check         production.yml {checks['production']:.3f} s   local.yml "
          f"{checks['local']:.3f} s   ratio {checks['production'] / checks['local']:.2f}")


if __name__ == "__main__":
    main()
