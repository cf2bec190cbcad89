"""The GitHub workflows call only tasks that exist, production waits for staging, and the
workflow linters (schema and security audit) pass them and catch broken ones."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
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


def test_deploy_checks_host_keys_from_the_environment_secret() -> None:
    """The known_hosts file is written from SSH_KNOWN_HOSTS before any task runs, and the
    tasks find it through DIFY_KNOWN_HOSTS."""
    steps = yaml.safe_load((WORKFLOWS / "deploy.yml").read_text())["jobs"]["staging"]["steps"]
    index, step = next((i, s) for i, s in enumerate(steps)
                       if "SSH_KNOWN_HOSTS" in s.get("env", {}))
    assert step["env"]["SSH_KNOWN_HOSTS"] == "${{ secrets.SSH_KNOWN_HOSTS }}"
    assert 'echo "DIFY_KNOWN_HOSTS=$RUNNER_TEMP/known_hosts" >> "$GITHUB_ENV"' in step["run"]
    assert "install -m 0644" in step["run"]
    first_task = next(i for i, s in enumerate(steps) if "inv " in s.get("run", ""))
    assert index < first_task


def test_ci_runs_the_readme_test_command() -> None:
    scripts = " ".join(run_lines(WORKFLOWS / "ci.yml"))
    assert ".venv/bin/python -m pytest -q" in scripts
    assert ".venv/bin/python -m pytest -q" in (ROOT / ".ci" / "run").read_text()
    assert "scripts/setup && .venv/bin/python -m pytest -q" in (ROOT / "README.md").read_text()


def linter(name: str) -> str:
    """A workflow linter of the test extras: next to this Python (the venv), else on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed (it comes with the test extras: "
                    f"pip install -e '.[test]')")
    return found


def lint(tool: str, folder: Path) -> subprocess.CompletedProcess:
    """Run one linter the way .ci/lint-workflows does, on every workflow of a folder."""
    files = sorted(str(path) for path in folder.glob("*.yml"))
    command = {"check-jsonschema": [linter(tool), "--builtin-schema", "vendor.github-workflows"],
               "zizmor": [linter(tool), "--offline", "--no-progress"]}[tool]
    return subprocess.run([*command, *files], capture_output=True, text=True, timeout=120,
                          check=False)


def broken_copy(tmp_path: Path, edit) -> Path:
    """The workflows copied to tmp_path/workflows, ci.yml changed by edit(text)."""
    folder = tmp_path / "workflows"
    shutil.copytree(WORKFLOWS, folder)
    ci = folder / "ci.yml"
    ci.write_text(edit(ci.read_text()))
    return folder


@pytest.mark.parametrize("tool", ["check-jsonschema", "zizmor"])
def test_the_workflows_pass_the_linters(tool: str) -> None:
    result = lint(tool, WORKFLOWS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_schema_check_catches_a_misspelt_key(tmp_path: Path) -> None:
    folder = broken_copy(tmp_path, lambda text: text.replace("runs-on:", "run-on:", 1))
    result = lint("check-jsonschema", folder)
    assert result.returncode != 0
    assert "$.jobs.lint: 'runs-on' is a required property" in result.stdout + result.stderr


def test_the_audit_catches_template_injection_and_unpinned_actions(tmp_path: Path) -> None:
    folder = broken_copy(tmp_path, lambda text: text.replace(
        "        run: ruff check .\n",
        "        run: ruff check . && echo \"${{ github.event.head_commit.message }}\"\n", 1)
        .replace("actions/checkout@11bd71901bbe5b1630ceea73d27597364c9af683",
                 "actions/checkout@v4", 1))
    result = lint("zizmor", folder)
    assert result.returncode != 0
    assert "template-injection" in result.stdout and "unpinned-uses" in result.stdout


def test_ci_runs_the_workflow_lint_where_it_runs_ruff() -> None:
    assert ".ci/lint-workflows" in " ".join(run_lines(WORKFLOWS / "ci.yml"))
    run = (ROOT / ".ci" / "run").read_text()
    assert run.index(".venv/bin/ruff check .") < run.index("bash .ci/lint-workflows") < \
        run.rindex(".venv/bin/python -m pytest")
    script = (ROOT / ".ci" / "lint-workflows").read_text()
    assert "--offline" in script and "vendor.github-workflows" in script
