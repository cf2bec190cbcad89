"""The GitHub workflows call only tasks that exist, and production waits for staging."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = ROOT / ".github" / "workflows"


def task_names() -> set[str]:
    """Every task of the `inv` namespace, dotted."""
    import tasks

    def walk(collection, prefix: str = ""):
        for name in collection.tasks:
            yield f"{prefix}{name}"
        for name, sub in collection.collections.items():
            yield from walk(sub, f"{prefix}{name}.")

    return set(walk(tasks.ns))


def run_lines(workflow: Path) -> list[str]:
    """Every `run:` script of every step of every job."""
    data = yaml.safe_load(workflow.read_text())
    return [step["run"] for job in data["jobs"].values() for step in job["steps"]
            if "run" in step]


def test_workflows_call_only_existing_tasks() -> None:
    known = task_names()
    called = {task for workflow in WORKFLOWS.glob("*.yml") for script in run_lines(workflow)
              for task in re.findall(r"(?:^|\s)inv ([a-z_]+\.[a-z_]+)", script)}
    assert called >= {"config.check", "deploy.all", "deploy.status"}
    assert called - known == set()


def test_production_deploys_after_staging_in_its_own_environment() -> None:
    jobs = yaml.safe_load((WORKFLOWS / "deploy.yml").read_text())["jobs"]
    assert jobs["production"]["needs"] == "staging"
    assert (jobs["staging"]["environment"], jobs["production"]["environment"]) == (
        "staging", "production")
    assert jobs["production"]["steps"] == jobs["staging"]["steps"]  # the same tasks, no extras


def test_ci_runs_the_readme_test_command() -> None:
    scripts = " ".join(run_lines(WORKFLOWS / "ci.yml"))
    assert ".venv/bin/python -m pytest -q" in scripts
    assert ".venv/bin/python -m pytest -q" in (ROOT / ".ci" / "run").read_text()
    assert "scripts/setup && .venv/bin/python -m pytest -q" in (ROOT / "README.md").read_text()
