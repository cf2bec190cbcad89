"""dev_frontend tier: Dify's web dev server (`pnpm dev`) on the front-end workstation.

Writes web/.env.local pointing at the VM's api, installs pnpm and the web's dependencies, and
keeps `pnpm dev` running: a systemd unit on Linux; on Windows (label `os: windows`, reached by
OpenSSH, commands in PowerShell) a scheduled task started now and at every logon.
"""

from __future__ import annotations

from tasks.core import facts, shell
from tasks.core.gates import CommandGate, HttpGate
from tasks.core.inventory import Host, Inventory, endpoint
from tasks.core.plan import RunCommand, Step, WaitFor, WriteFile
from tasks.core.render import Renderer
from tasks.core.system import restart_unit, service_running
from tasks.core.tiers import Tier
from tasks.core.windows import is_windows, ps_quote
from tasks.tiers.dev_common import (
    API_PORT,
    WEB_PORT,
    as_user,
    backend,
    check,
    clone_step_needed,
    clone_steps,
    dev_user,
    frontend_checkout,
    windows_join,
)

WEB_UNIT = "dify-web-dev.service"
UNIT_DIR = "/etc/systemd/system"
INSTALL_STAMP = "node_modules/.difyops-installed"
# Windows: where the start script, its log and stamps live, and the scheduled task's name.
WINDOWS_STATE = r"C:\ProgramData\difyops"
TASK_NAME = "dify-web-dev"
WINDOWS_LOG = f"{WINDOWS_STATE}\\{TASK_NAME}.log"


def env_local(inventory: Inventory, renderer: Renderer, host: Host) -> str:
    """web/.env.local: the api prefixes of the VM's api."""
    return renderer.render("config/dev/web.env.local.j2", host, backend=backend(inventory),
                           api_port=API_PORT)


def steps(inventory: Inventory, renderer: Renderer, host: Host) -> list[Step]:
    """The Linux or the Windows (PowerShell) variant, chosen by the host's `os` label."""
    check(inventory)
    if is_windows(host):
        return windows_steps(inventory, renderer, host)
    return linux_steps(inventory, renderer, host)


def linux_steps(inventory: Inventory, renderer: Renderer, host: Host) -> list[Step]:
    """Node.js and pnpm, checkout, .env.local, pnpm install, a systemd unit, the page answers."""
    user = dev_user(inventory, host)
    root = frontend_checkout(inventory)
    web_dir = f"{root}/web"
    web = shell.quote(web_dir)
    registry = inventory.settings.dev.npm_registry
    npm_env = "env CI=true" + (f" npm_config_registry={shell.quote(registry)}" if registry else "")
    env_file = f"{web_dir}/.env.local"
    unit = f"{UNIT_DIR}/{WEB_UNIT}"
    plan: list[Step] = [
        RunCommand("install nodejs npm",
                   "export DEBIAN_FRONTEND=noninteractive; apt-get update -q && "
                   "apt-get install -y -q --no-install-recommends nodejs npm",
                   unless=facts.all_found("node", "npm")),
        RunCommand("install pnpm", f"{npm_env} npm install --global --silent pnpm",
                   unless=facts.all_found("pnpm")),
    ]
    plan += clone_steps(inventory, root, user)
    digest = "sha256sum package.json $(ls pnpm-lock.yaml 2>/dev/null)"
    write_stamp = shell.quote(f"mkdir -p node_modules && {digest} > {INSTALL_STAMP}")
    compare_stamp = shell.quote(f"{digest} | cmp -s - {INSTALL_STAMP}")
    plan += [
        RunCommand(f"{web_dir} holds Dify's web", f"test -f {web}/package.json || {{ echo 'no "
                   f"package.json in {web_dir}: the checkout must be Dify' >&2; exit 1; }}",
                   changes=False),
        WriteFile(env_file, env_local(inventory, renderer, host), owner=user, group=user),
        RunCommand("install the web's dependencies (pnpm install)",
                   f"cd {web} && {as_user(user)}{npm_env} pnpm install --reporter=silent && "
                   f"{as_user(user)}sh -c {write_stamp}",
                   unless=f"cd {web} && test -f {INSTALL_STAMP} && sh -c {compare_stamp}"),
        WriteFile(unit, renderer.render("config/dev/dify-web-dev.service.j2", host, user=user,
                                        web_dir=web_dir, web_port=WEB_PORT)),
        service_running(WEB_UNIT),
        RunCommand("restart the web dev server",
                   f"systemctl daemon-reload && systemctl restart {WEB_UNIT}",
                   on_change=(env_file, unit)),
        WaitFor(HttpGate("web dev server /", timeout=300, interval=2,
                         url=f"http://{endpoint(host.address, WEB_PORT)}/"),
                restart=restart_unit(WEB_UNIT)),
    ]
    return plan


def windows_steps(inventory: Inventory, renderer: Renderer, host: Host) -> list[Step]:
    """The same in PowerShell: winget Node.js, pnpm, .env.local, a scheduled task for pnpm dev."""
    root = frontend_checkout(inventory)
    web_dir = windows_join(root, "web")
    web = ps_quote(web_dir)
    registry = inventory.settings.dev.npm_registry
    npm_env = f"$env:npm_config_registry = {ps_quote(registry)}; " if registry else ""
    env_file = windows_join(web_dir, ".env.local")
    script = windows_join(WINDOWS_STATE, f"{TASK_NAME}.ps1")
    started = ps_quote(windows_join(WINDOWS_STATE, f"{TASK_NAME}.started"))
    task = ps_quote(TASK_NAME)
    installed = ("(Get-FileHash -LiteralPath package.json, pnpm-lock.yaml "
                 "-ErrorAction SilentlyContinue | ForEach-Object Hash) -join ','")
    running = (f"(Get-FileHash -LiteralPath {ps_quote(script)}, {ps_quote(env_file)} "
               f"| ForEach-Object Hash) -join ','")
    plan: list[Step] = [
        RunCommand("install Node.js LTS (winget)",
                   "winget install --id OpenJS.NodeJS.LTS --exact --silent "
                   "--accept-package-agreements --accept-source-agreements",
                   unless="Get-Command node, npm | Out-Null"),
        RunCommand("install pnpm", f"{npm_env}npm install --global --silent pnpm",
                   unless="Get-Command pnpm | Out-Null"),
    ]
    if clone_step_needed(inventory):
        dev = inventory.settings.dev
        branch = f"--branch {ps_quote(dev.dify_ref)} " if dev.dify_ref else ""
        plan.append(RunCommand(
            f"clone {dev.dify_source} into {root}",
            f"git clone --quiet {branch}{ps_quote(dev.dify_source)} {ps_quote(root)}",
            unless=f"if (-not (Test-Path -LiteralPath {ps_quote(windows_join(root, '.git'))})) "
                   f"{{ exit 1 }}"))
    package_json = ps_quote(windows_join(web_dir, "package.json"))
    not_dify = ps_quote(f"no package.json in {web_dir}: the checkout must be Dify")
    arguments = ps_quote(f'-NoProfile -ExecutionPolicy Bypass -File "{script}"')
    stamp = ps_quote(INSTALL_STAMP)
    plan += [
        RunCommand(f"{web_dir} holds Dify's web",
                   f"if (-not (Test-Path -LiteralPath {package_json})) "
                   f"{{ [Console]::Error.WriteLine({not_dify}); exit 1 }}", changes=False),
        WriteFile(env_file, env_local(inventory, renderer, host)),
        RunCommand("install the web's dependencies (pnpm install)",
                   f"Set-Location -LiteralPath {web}; $env:CI = 'true'; {npm_env}"
                   f"pnpm install --reporter=silent; if ($LASTEXITCODE) {{ exit $LASTEXITCODE }}; "
                   f"New-Item -ItemType Directory -Force -Path node_modules | Out-Null; "
                   f"Set-Content -LiteralPath {stamp} -Value ({installed})",
                   unless=f"Set-Location -LiteralPath {web}; if (\"$(Get-Content -LiteralPath "
                          f"{stamp} -ErrorAction SilentlyContinue)\" -ne ({installed})) "
                          f"{{ exit 1 }}"),
        WriteFile(script, renderer.render("config/dev/dify-web-dev.ps1.j2", host,
                                          task_name=TASK_NAME, log=WINDOWS_LOG, web_port=WEB_PORT,
                                          web_dir_literal=web, log_literal=ps_quote(WINDOWS_LOG))),
        RunCommand(f"register the scheduled task {TASK_NAME}",
                   f"$action = New-ScheduledTaskAction -Execute 'powershell.exe' "
                   f"-Argument {arguments}; "
                   f"$trigger = New-ScheduledTaskTrigger -AtLogOn -User $env:USERNAME; "
                   f"$settings = New-ScheduledTaskSettingsSet -ExecutionTimeLimit "
                   f"([TimeSpan]::Zero) -AllowStartIfOnBatteries -DontStopIfGoingOnBatteries; "
                   f"$principal = New-ScheduledTaskPrincipal -UserId $env:USERNAME "
                   f"-LogonType S4U; Register-ScheduledTask -TaskName {task} -Action $action "
                   f"-Trigger $trigger -Settings $settings -Principal $principal -Force "
                   f"| Out-Null",
                   unless=f"Get-ScheduledTask -TaskName {task} | Out-Null"),
        RunCommand("(re)start the web dev server",
                   f"Stop-ScheduledTask -TaskName {task}; Get-NetTCPConnection -LocalPort "
                   f"{WEB_PORT} -State Listen -ErrorAction SilentlyContinue | ForEach-Object "
                   f"{{ Stop-Process -Id $_.OwningProcess -Force -ErrorAction SilentlyContinue }}; "
                   f"Start-ScheduledTask -TaskName {task}; "
                   f"Set-Content -LiteralPath {started} -Value ({running})",
                   unless=f"if ((Get-ScheduledTask -TaskName {task}).State -ne 'Running') "
                          f"{{ exit 1 }}; if (\"$(Get-Content -LiteralPath {started} "
                          f"-ErrorAction SilentlyContinue)\" -ne ({running})) {{ exit 1 }}"),
        WaitFor(CommandGate("web dev server /", timeout=300, interval=2,
                            command=f"$answer = Invoke-WebRequest -UseBasicParsing -TimeoutSec 5 "
                                    f"-Uri 'http://127.0.0.1:{WEB_PORT}/'; "
                                    f"if ($answer.StatusCode -ne 200) {{ exit 1 }}; "
                                    f"'HTTP ' + $answer.StatusCode")),
    ]
    return plan


TIER = Tier("dev_frontend", "Dify web dev server on the front-end workstation",
            ("dev_frontend",), steps)
