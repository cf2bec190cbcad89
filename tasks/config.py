"""config: validate the inventory, render every file, generate secrets."""

from __future__ import annotations

import tempfile
from pathlib import Path

import yaml
from invoke import Context, task
from invoke.exceptions import Exit

from tasks.core import secrets
from tasks.core.cli import load, reported
from tasks.core.dify_source import draft_profile, open_source
from tasks.core.project import ROOT, display
from tasks.core.render import write_tree
from tasks.core.tiers import build
from tasks.core.validators import validate
from tasks.tiers import TIERS, app_summary


@task
@reported
def check(ctx: Context) -> None:
    """Validate the inventory and secrets, render every file and run the real validators."""
    inventory = load(ctx)
    plans = build(TIERS, inventory)
    with tempfile.TemporaryDirectory(prefix="difyops-check.") as scratch:
        count = write_tree(plans, Path(scratch))
        verdicts = validate(Path(scratch), inventory.secrets.values())
    print(f"inventory {display(inventory.file)}: valid ({len(inventory.hosts)} host(s), "
          f"Dify {inventory.profile.version}); rendered {count} files")
    for line in app_summary.lines(plans, inventory):
        print(line)
    for verdict in verdicts:
        print(f"  {verdict}")
    failed = [v for v in verdicts if v.status == "failed"]
    ran = sorted({v.tool for v in verdicts if v.status != "skipped"})
    skipped = sorted({v.tool for v in verdicts if v.status == "skipped"})
    print(f"validators run: {', '.join(ran) or 'none'}; skipped: {', '.join(skipped) or 'none'}")
    if failed:
        raise Exit(f"error: {len(failed)} rendered file(s) failed validation", code=1)


@task(help={"out": "folder to write into (default: rendered/<inventory name>)"})
@reported
def render(ctx: Context, out: str = "") -> None:
    """Render every file for every host under OUT/<host>/<path> (secrets 0600)."""
    inventory = load(ctx)
    target = Path(out) if out else ROOT / "rendered" / inventory.name
    count = write_tree(build(TIERS, inventory), target)
    print(f"rendered {count} files for {len(inventory.hosts)} hosts under {display(target)}")


@task(name="profile-draft", help={"source": "a Dify checkout folder or a release tarball"})
@reported
def profile_draft(ctx: Context, source: str) -> None:
    """Print a draft version profile read from a Dify release's source, for review."""
    with tempfile.TemporaryDirectory(prefix="difyops-dify.") as scratch:
        release = open_source(Path(source), Path(scratch))
        draft = draft_profile(release)
    print(f"# Drafted from the source of Dify {draft['version']}: review it, add env_required, "
          f"weaviate_min_version and upgrade_steps,\n# then save it as "
          f"config/profiles/{draft['version']}.yml and run tests/unit/test_dify_source.py.")
    print(yaml.safe_dump(draft, sort_keys=False), end="")


@task(name="secrets")
@reported
def generate_secrets(ctx: Context) -> None:
    """Generate the inventory's missing secrets (mode 0600, never overwritten, never printed)."""
    inventory = load(ctx, check_secrets=False)
    written = secrets.generate(inventory)
    where = display(inventory.secrets_file)
    if secrets.from_command(inventory):
        print("secrets come from secrets.command: nothing is generated or written here; "
              "checking what it prints")
    elif written:
        print(f"generated {', '.join(written)} in {where} (mode 0600)")
        if "BACKUP_PASSPHRASE" in written:
            print(f"note: {secrets.BACKUP_PASSPHRASE_NOTE}")
    else:
        print(f"{where}: every secret this inventory needs is already set; nothing changed")
    _, problems = secrets.read(inventory)
    if problems:
        raise Exit("error: " + "\n".join(str(p) for p in problems), code=1)
