"""Offline validators for rendered files: the real tools, run where they are installed.

Each validator picks the rendered files it understands and checks them with the tool the host
will use (nginx -t, docker compose config, promtool, amtool). A missing tool is reported as skipped,
never as passed.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

NGINX_SITE_DIRS = ("/etc/nginx/sites-available/", "/etc/nginx/sites-enabled/",
                   "/etc/nginx/conf.d/")
TLS_DIR = "/etc/nginx/tls/"


@dataclass(frozen=True)
class Verdict:
    """The outcome of one validator on one file."""

    tool: str
    target: str
    status: str  # passed | failed | skipped
    detail: str = ""

    def __str__(self) -> str:
        detail = f": {self.detail}" if self.detail else ""
        return f"{self.status:7} {self.tool:22} {self.target}{detail}"


Validator = Callable[[Path], list[Verdict]]


def run_tool(command: list[str], cwd: Path | None = None) -> tuple[bool, str]:
    """Run a validator command; (passed, last lines of its output)."""
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120,
                            check=False)
    output = (result.stderr.strip() or result.stdout.strip()).splitlines()
    return result.returncode == 0, " | ".join(output[-3:])


def hosts_files(root: Path, suffix_or_dir: Callable[[str], bool]) -> list[tuple[str, Path]]:
    """(host/path, file) for every rendered file whose host path matches."""
    found = []
    for host_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for file in sorted(p for p in host_dir.rglob("*") if p.is_file()):
            host_path = "/" + str(file.relative_to(host_dir))
            if suffix_or_dir(host_path):
                found.append((f"{host_dir.name}:{host_path}", file))
    return found


def nginx(root: Path) -> list[Verdict]:
    """nginx -t on every rendered site, inside a throwaway main config with a dummy cert."""
    sites = hosts_files(root, lambda path: path.startswith(NGINX_SITE_DIRS))
    if not sites:
        return []
    binary = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists()
                                       else None)
    if not binary:
        return [Verdict("nginx -t", target, "skipped", "nginx is not installed")
                for target, _ in sites]
    verdicts = []
    for target, site in sites:
        with tempfile.TemporaryDirectory(prefix="difyops-nginx.") as scratch:
            prefix = Path(scratch)
            tls = prefix / "tls"
            tls.mkdir()
            dummy_certificate(tls)
            text = site.read_text().replace(TLS_DIR, f"{tls}/")
            (prefix / "site.conf").write_text(text)
            mime = "include /etc/nginx/mime.types;" if Path("/etc/nginx/mime.types").exists() \
                else ""
            (prefix / "nginx.conf").write_text(
                f"pid {prefix}/nginx.pid;\nerror_log stderr;\nevents {{}}\n"
                f"http {{ {mime} include {prefix}/site.conf; }}\n")
            passed, output = run_tool([binary, "-t", "-q", "-p", str(prefix), "-c",
                                       str(prefix / "nginx.conf")])
        verdicts.append(Verdict("nginx -t", target, "passed" if passed else "failed",
                                "" if passed else output))
    return verdicts


def dummy_certificate(folder: Path) -> None:
    """A throwaway self-signed pair under every name a site may reference."""
    key, cert = folder / "dify.key", folder / "dify.crt"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=validate", "-keyout", str(key), "-out", str(cert)],
                   capture_output=True, check=True, timeout=60)


def compose(root: Path) -> list[Verdict]:
    """docker compose config on every rendered compose file (its env files beside it)."""
    files = hosts_files(root, lambda path: path.endswith(("compose.yml", "compose.yaml")))
    if not files:
        return []
    docker = shutil.which("docker")
    available = docker and subprocess.run([docker, "compose", "version"], capture_output=True,
                                          check=False, timeout=30).returncode == 0
    if not available:
        return [Verdict("docker compose config", target, "skipped",
                        "docker compose v2 is not installed") for target, _ in files]
    verdicts = []
    for target, file in files:
        passed, output = run_tool([docker, "compose", "-f", str(file), "config", "-q"],
                                  cwd=file.parent)
        verdicts.append(Verdict("docker compose config", target,
                                "passed" if passed else "failed", "" if passed else output))
    return verdicts


def promtool(root: Path) -> list[Verdict]:
    """promtool on rendered Prometheus files: `check config` on prometheus.yml (which checks the
    rule files it names: relative names resolve beside it in the rendered tree, as on the host)
    and `check rules` on rule files under a rules/ folder. Other files are not Prometheus'."""
    configs = hosts_files(root, lambda path: "/prometheus/" in path
                          and path.endswith("/prometheus.yml"))
    rules = hosts_files(root, lambda path: "/prometheus/" in path and "/rules/" in path
                        and path.endswith((".yml", ".yaml")))
    checks = [("config", target, file) for target, file in configs] + \
             [("rules", target, file) for target, file in rules]
    if not checks:
        return []
    binary = shutil.which("promtool")
    if not binary:
        return [Verdict(f"promtool check {kind}", target, "skipped", "promtool is not installed")
                for kind, target, _ in checks]
    verdicts = []
    for kind, target, file in checks:
        passed, output = run_tool([binary, "check", kind, str(file)], cwd=file.parent)
        verdicts.append(Verdict(f"promtool check {kind}", target,
                                "passed" if passed else "failed", "" if passed else output))
    return verdicts


def amtool(root: Path) -> list[Verdict]:
    """amtool check-config on rendered Alertmanager configurations."""
    files = hosts_files(root, lambda path: path.endswith("/alertmanager.yml"))
    if not files:
        return []
    binary = shutil.which("amtool")
    if not binary:
        return [Verdict("amtool check-config", target, "skipped", "amtool is not installed")
                for target, _ in files]
    verdicts = []
    for target, file in files:
        passed, output = run_tool([binary, "check-config", str(file)], cwd=file.parent)
        verdicts.append(Verdict("amtool check-config", target,
                                "passed" if passed else "failed", "" if passed else output))
    return verdicts


VALIDATORS: tuple[Validator, ...] = (nginx, compose, promtool, amtool)


def validate(root: Path, hide: Iterable[str] = ()) -> list[Verdict]:
    """Every validator over a folder of rendered files (root/<host>/<path>). A tool's output
    may quote a line of a file: every value in `hide` (the secrets) is masked in it."""
    secrets = sorted((value for value in hide if len(value) >= 4), key=len, reverse=True)
    verdicts = [verdict for validator in VALIDATORS for verdict in validator(root)]
    return [dataclasses.replace(verdict, detail=mask(verdict.detail, secrets))
            for verdict in verdicts]


def mask(text: str, secrets: list[str]) -> str:
    """The text with every occurrence of a secret replaced by `***`."""
    for secret in secrets:
        text = text.replace(secret, "***")
    return text
