"""The lb tier on real hosts: nginx deployed by `inv lb.deploy` in front of stand-in Dify services.

Hosts: lbx (the balancer), lbup1 (api, web, plugin daemon) and lbup2 (api, web), the upstreams
running tests/integration/standin_upstream.py as systemd units. Every request goes to the
balancer's address; who answered is read from the stand-in's answer (its host name), from its
request log, and from nginx's own access log. The tests run in file order on shared hosts: each
leaves the balancer deployed, in service and with both upstream hosts answering.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from tests.integration.lab import Lab, LabHost
from tests.integration.support import eventually

ROOT = Path(__file__).resolve().parents[2]
STANDIN = Path(__file__).with_name("standin_upstream.py")
LIVE = "/etc/nginx/sites-enabled/dify.conf"
MB = 1024 * 1024
API_ROUTES = ("/console/api", "/api", "/v1", "/files", "/mcp", "/triggers")
UNIT = """[Unit]
Description=difyops test stand-in for Dify's %i
[Service]
ExecStart=/usr/bin/python3 /usr/local/lib/difyops-standin/standin_upstream.py %i
"""


class Lb:
    """The module's hosts, inventory and `inv` runner."""

    def __init__(self, lab: Lab, tmp: Path) -> None:
        self.lb, self.up1, self.up2 = lab.start(["lbx", "lbup1", "lbup2"])
        self.tmp = tmp
        self.inventory_file = tmp / "lb-lab.yml"
        self.env = {"DIFY_INVENTORY": str(self.inventory_file),
                    "DIFY_SECRETS": str(tmp / "lb-lab.env")}
        self.first_deploy = ""
        self.write_inventory()

    @property
    def url(self) -> str:
        return f"http://{self.lb.address}"

    def write_inventory(self, **settings: Any) -> None:
        data = {
            "name": "lb-lab",
            "domain": "dify.lab",
            "storage": {"type": "shared-fs"},
            "db": {"max_connections": 400},
            "cache": {"mode": "standalone"},
            "vector": {"store": "pgvector"},
            "upload_limit_mb": 100,
            # failures never take a stand-in out for long; retries stay deterministic
            "lb": {"max_fails": 10, "fail_timeout": 2, "drain_wait": 30},
            "net": {"firewall": "off"},
            **settings,
            "hosts": [
                self.lb.inventory_entry(["lb"], user="deploy"),  # through sudo
                self.up1.inventory_entry(["api", "web", "plugin_daemon", "worker", "beat",
                                          "db_primary", "cache"]),
                self.up2.inventory_entry(["api", "web", "worker"], user="deploy"),
            ],
        }
        self.inventory_file.write_text(yaml.safe_dump(data))

    def inv(self, *args: str, root: Path = ROOT) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "invoke", *args], cwd=root, text=True,
                              capture_output=True, env={**os.environ, **self.env}, timeout=600,
                              check=False)

    def deploy(self, root: Path = ROOT) -> str:
        result = self.inv("lb.deploy", root=root)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return requests.get(self.url + path, timeout=15, **kwargs)

    def who(self, path: str = "/v1/whoami") -> str:
        response = self.get(path)
        assert response.status_code == 200, response.text
        return response.json()["host"]

    def live_digest(self) -> str:
        return self.lb.exec(f"sha256sum {LIVE}")[1].split()[0]

    def worker_pids(self) -> set[str]:
        return set(self.lb.exec("pgrep -f 'nginx: worker process'")[1].split())

    def both_answer(self, path: str = "/v1/whoami") -> None:
        """Round robin reaches both upstream hosts again (after a drain, a stop, a failure)."""
        seen: set[str] = set()
        eventually(f"both api hosts answering {path}",
                   lambda: seen.add(self.who(path)) or seen == {"lbup1", "lbup2"}, timeout=30)


def install_standin(host: LabHost, roles: list[str]) -> None:
    script = base64.b64encode(STANDIN.read_bytes()).decode()
    unit = base64.b64encode(UNIT.encode()).decode()
    code, out = host.exec(
        "set -e; mkdir -p /usr/local/lib/difyops-standin; "
        f"echo {script} | base64 -d > /usr/local/lib/difyops-standin/standin_upstream.py; "
        f"echo {unit} | base64 -d > /etc/systemd/system/difyops-standin@.service; "
        "systemctl daemon-reload; "
        + " ".join(f"systemctl start difyops-standin@{role};" for role in roles))
    assert code == 0, out
    for role, port, path in (("api", 5001, "/health"), ("web", 3000, "/"),
                             ("plugin", 5002, "/health/check"), ("websocket", 5006, "/health")):
        if role in roles:
            eventually(f"stand-in {role} on {host.name}", lambda p=port, q=path: requests.get(
                f"http://{host.address}:{p}{q}", timeout=2).ok)


def posts(host: LabHost, path: str) -> int:
    """How many POSTs to path the stand-in on host has received."""
    _, out = host.exec("cat /var/lib/difyops-standin/requests 2>/dev/null || true")
    return out.splitlines().count(f"POST {path}")


@pytest.fixture(scope="module")
def env(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Lb:
    """Three hosts, the stand-ins started, secrets generated and the lb tier deployed once."""
    the = Lb(lab, tmp_path_factory.mktemp("lb"))
    install_standin(the.up1, ["api", "web", "plugin", "websocket"])
    install_standin(the.up2, ["api", "web", "websocket"])
    secrets = the.inv("config.secrets")
    assert secrets.returncode == 0, secrets.stdout + secrets.stderr
    dry = the.inv("lb.deploy", "--dry")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "publish the site (drained hosts stay down) if nginx -t accepts it ... would change" \
        in dry.stdout
    assert the.lb.exec("test -e /etc/nginx")[0] != 0  # the dry run installed nothing
    the.first_deploy = the.deploy()
    return the


def test_deploy_then_a_second_deploy_changes_nothing(env: Lb) -> None:
    assert "publish the site (drained hosts stay down) if nginx -t accepts it ... changed" in \
        env.first_deploy
    assert env.lb.exec("test -L /etc/nginx/sites-enabled/default")[0] != 0
    second = env.deploy()
    header = second.split("summary:")[1].strip().splitlines()[0]
    assert header.split() == ["host", "unchanged"], second


def test_every_route_reaches_its_upstream(env: Lb) -> None:
    for prefix in API_ROUTES:
        answer = env.get(f"{prefix}/difyops-route").json()
        assert (answer["role"], answer["path"]) == ("api", f"{prefix}/difyops-route"), prefix
        assert answer["host"] in ("lbup1", "lbup2")
    env.both_answer()

    hook = env.get("/e/plugin-endpoint/hook?x=1")
    assert hook.status_code == 200
    answer = hook.json()
    assert (answer["role"], answer["host"]) == ("plugin", "lbup1")
    headers = answer["headers"]
    assert headers["Dify-Hook-Url"] == f"{env.url}/e/plugin-endpoint/hook?x=1"
    # the location's own proxy_set_header did not drop the common ones
    assert headers["Host"] == env.lb.address and headers["X-Forwarded-Proto"] == "http"
    assert "X-Forwarded-For" in headers and headers.get("Connection", "") != "close"

    for path in ("/", "/explore/apps"):
        page = env.get(path)
        assert page.status_code == 200 and "web on lbup" in page.text, path

    asset = env.get("/_next/static/chunks/main-123.js")
    assert asset.status_code == 200 and asset.text.startswith("// web on lbup")
    assert asset.headers["Cache-Control"] == "public, max-age=31536000, immutable"
    assert asset.headers["Content-Encoding"] == "gzip"
    # its own add_header did not drop the security headers
    assert asset.headers["X-Frame-Options"] == "SAMEORIGIN"
    assert asset.headers["X-Content-Type-Options"] == "nosniff"
    assert env.get("/console/api/x").headers["X-Content-Type-Options"] == "nosniff"

    health = env.get("/health")
    assert (health.status_code, health.text) == (200, "ok\n")


def test_upstream_connections_are_kept_alive(env: Lb) -> None:
    served = [env.get("/v1/keepalive").json()["served_on_connection"] for _ in range(8)]
    assert max(served) > 1, served  # one TCP connection carried several requests


def test_server_sent_events_arrive_one_by_one(env: Lb) -> None:
    started = time.monotonic()
    arrivals = []
    with env.get("/v1/chat-messages/sse", stream=True) as response:
        assert response.headers["Content-Type"] == "text/event-stream"
        assert "Content-Encoding" not in response.headers
        for chunk in response.iter_content(chunk_size=None):
            arrivals += [time.monotonic() - started] * chunk.count(b"data: ")
    finished = time.monotonic() - started
    assert len(arrivals) == 4
    # the stand-in sends one event every 0.6 s: buffered, all would arrive at the very end
    assert arrivals[0] < finished - 1.2, (arrivals, finished)
    assert arrivals[-1] - arrivals[0] > 1.2, arrivals


def test_upload_limit(env: Lb) -> None:
    before = posts(env.up1, "/console/api/files/upload") + posts(env.up2,
                                                                "/console/api/files/upload")
    upload = requests.post(f"{env.url}/console/api/files/upload", data=b"x" * (50 * MB),
                           timeout=60)
    assert upload.status_code == 200, upload.text[:200]
    assert upload.json()["received"] == 50 * MB

    with socket.create_connection((env.lb.address, 80), timeout=15) as conn:
        conn.sendall(f"POST /console/api/files/upload HTTP/1.1\r\nHost: dify.lab\r\n"
                     f"Content-Length: {101 * MB}\r\n\r\n".encode() + b"x" * 65536)
        reply = conn.recv(4096)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:100]
    after = posts(env.up1, "/console/api/files/upload") + posts(env.up2,
                                                               "/console/api/files/upload")
    assert after == before + 1  # the refused one never reached an api


def test_status_and_check(env: Lb) -> None:
    status = env.inv("lb.status")
    assert status.returncode == 0, status.stdout + status.stderr
    lb_row = next(line.split() for line in status.stdout.splitlines()
                  if line.startswith("lbx ") and "active" in line)
    assert lb_row[:6] == ["lbx", "active", "200", "yes", "off", "ok"]
    rows = {tuple(line.split()[1:3]): line for line in status.stdout.splitlines()
            if line.startswith("lbx ") and "dify_" in line}
    assert set(rows) == {("dify_api", "lbup1"), ("dify_api", "lbup2"), ("dify_web", "lbup1"),
                         ("dify_web", "lbup2"), ("dify_plugin_daemon", "lbup1"),
                         ("dify_websocket", "lbup1"), ("dify_websocket", "lbup2")}
    assert all(line.endswith("in service") for line in rows.values())

    check = env.inv("lb.check")
    assert check.returncode == 0, check.stdout + check.stderr
    probes = {line.split()[1]: line.split() for line in check.stdout.splitlines()[1:]}
    assert probes["/health"][3] == "200"
    for prefix in API_ROUTES:
        row = probes[f"{prefix}/difyops-check"]
        assert row[2] == "dify_api" and row[4] in ("lbup1", "lbup2") and row[-1] == "ok", row
    assert probes["/e/difyops-check"][4] == "lbup1"
    socket_io = probes["/socket.io/difyops-check"]
    assert socket_io[2] == "dify_websocket" and socket_io[4] in ("lbup1", "lbup2"), socket_io
    assert probes["/_next/static/difyops-check"][3] == "200"
    assert probes["/"][2:4] == ["dify_web", "200"] and probes["/"][4] in ("lbup1", "lbup2")


def test_drain_lets_requests_in_flight_finish_then_undrain(env: Lb) -> None:
    before = env.live_digest()
    unknown = env.inv("lb.drain", "nosuch")
    assert unknown.returncode == 1
    assert "no host named 'nosuch'" in unknown.stderr
    not_member = env.inv("lb.drain", "lbx")
    assert not_member.returncode == 1 and "not behind the load balancer" in not_member.stderr
    assert env.live_digest() == before
    assert env.lb.exec("test -e /var/lib/difyops/lb/drained")[0] != 0  # nothing touched

    slow: dict[str, Any] = {}
    token = "t" + os.urandom(4).hex()

    def request() -> None:
        response = env.get(f"/v1/slow?seconds=6&token={token}")
        slow.update(status=response.status_code, host=response.json()["host"],
                    at=time.monotonic())

    thread = threading.Thread(target=request)
    thread.start()
    victim = eventually("the slow request reaching an api host", lambda: next(
        (h.name for h in (env.up1, env.up2)
         if h.exec(f"test -e /run/difyops-standin/slow-{token}")[0] == 0), None))
    other = "lbup2" if victim == "lbup1" else "lbup1"

    drained = env.inv("lb.drain", victim)
    returned = time.monotonic()
    thread.join(10)
    assert drained.returncode == 0, drained.stdout + drained.stderr
    assert f"lbx: {victim} out of dify_api, dify_web, dify_websocket: changed" in drained.stdout
    assert slow["status"] == 200 and slow["host"] == victim  # not cut off by the reload
    assert returned >= slow["at"] - 0.5  # drain waited for it
    assert {env.who() for _ in range(10)} == {other}
    assert all(f"web on {other}<" in env.get("/").text for _ in range(4))

    status = env.inv("lb.status")
    assert any(line.split()[1:3] == ["dify_api", victim] and line.endswith("drained (down)")
               for line in status.stdout.splitlines() if line.startswith("lbx "))

    workers = env.worker_pids()
    again = env.inv("lb.drain", victim)
    assert again.returncode == 0 and "already so, nothing changed" in again.stdout
    assert env.worker_pids() == workers  # no reload

    last = env.inv("lb.drain", other)
    assert last.returncode == 1
    assert f"draining {other} would leave dify_api on lbx with no server" in last.stderr
    assert {env.who() for _ in range(4)} == {other}

    back = env.inv("lb.undrain", victim)
    assert back.returncode == 0, back.stdout + back.stderr
    assert f"lbx: {victim} back in dify_api, dify_web, dify_websocket: changed" in back.stdout
    env.both_answer()
    assert env.inv("lb.deploy").stdout.split("summary:")[1].split()[:2] == ["host", "unchanged"]


def test_a_post_that_reached_a_dying_api_is_not_replayed(env: Lb) -> None:
    env.up1.exec("touch /run/difyops-standin/drop")
    try:
        gets = [env.get("/v1/drop").status_code for _ in range(4)]
        sent = 6
        before = posts(env.up1, "/v1/drop") + posts(env.up2, "/v1/drop")
        answers = [requests.post(f"{env.url}/v1/drop", data=b"{}", timeout=15).status_code
                   for _ in range(sent)]
        received = posts(env.up1, "/v1/drop") + posts(env.up2, "/v1/drop") - before
    finally:
        env.up1.exec("rm -f /run/difyops-standin/drop")
    assert gets == [200] * 4  # a GET is idempotent: passed on to the other api
    _, log = env.lb.exec("grep 'GET /v1/drop' /var/log/nginx/dify.access.log")
    assert 'ustatus="502, 200"' in log
    assert 502 in answers and 200 in answers, answers
    assert received == sent, (answers, received)  # every POST reached one api, once
    env.both_answer()


def test_with_one_api_stopped_gets_and_posts_still_succeed(env: Lb) -> None:
    env.up2.exec("systemctl stop difyops-standin@api")
    try:
        hosts = [env.who() for _ in range(12)]
        before = posts(env.up1, "/v1/workflows/run")
        answers = [requests.post(f"{env.url}/v1/workflows/run", json={}, timeout=15)
                   for _ in range(6)]
        received = posts(env.up1, "/v1/workflows/run") - before
    finally:
        env.up2.exec("systemctl start difyops-standin@api")
    assert set(hosts) == {"lbup1"}  # and no 502: who() asserted 200 every time
    # refused connections: nothing was sent, so even a POST may go on, once
    assert [a.status_code for a in answers] == [200] * 6 and received == 6
    eventually("the stand-in api back on lbup2",
               lambda: requests.get(f"http://{env.up2.address}:5001/health", timeout=2).ok)
    env.both_answer()


def test_a_broken_template_is_refused_and_the_old_config_keeps_serving(
        env: Lb, tmp_path: Path) -> None:
    """nginx -t on the control machine refuses the rendered site before any host is touched,
    in a dry run too; the live site stays as it was."""
    copy = tmp_path / "difyops"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(
        ".git", ".venv", "__pycache__", "rendered", ".secrets", "tests"))
    template = copy / "nginx" / "dify.conf.j2"
    template.write_text(template.read_text().replace("    gzip on;", "    gzip maybe;"))
    before = env.live_digest()
    for dry in ((), ("--dry",)):
        broken = env.inv("lb.deploy", *dry, root=copy)
        assert broken.returncode == 1
        assert "rendered files fail validation; no host was touched" in broken.stderr
        assert 'invalid value "maybe"' in broken.stderr
        assert "[lb] lbx" not in broken.stdout  # no step of any host ran
    assert env.live_digest() == before
    status = env.inv("lb.status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert env.who() in ("lbup1", "lbup2")
    env.deploy()  # the good template: nothing to publish, the live site is already right
    assert env.live_digest() == before


def test_tls_self_signed_redirects_and_answers_with_hsts(env: Lb) -> None:
    env.write_inventory(tls={"mode": "self-signed"})
    try:
        env.deploy()
        https = f"https://{env.lb.address}"
        redirect = env.get("/v1/whoami?x=1", allow_redirects=False)
        assert redirect.status_code == 301
        assert redirect.headers["Location"] == f"{https}/v1/whoami?x=1"
        assert env.get("/health").text == "ok\n"  # the gate's plain-HTTP probe still answers

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            api = requests.get(f"{https}/console/api/x", verify=False, timeout=15)
            hook = requests.get(f"{https}/e/hook", verify=False, timeout=15).json()
            asset = requests.get(f"{https}/_next/static/a.js", verify=False, timeout=15)
        assert api.json()["role"] == "api"
        assert api.json()["headers"]["X-Forwarded-Proto"] == "https"
        hsts = "max-age=63072000; includeSubDomains"
        assert api.headers["Strict-Transport-Security"] == hsts
        assert asset.headers["Strict-Transport-Security"] == hsts
        assert asset.headers["Cache-Control"] == "public, max-age=31536000, immutable"
        assert hook["headers"]["Dify-Hook-Url"] == f"{https}/e/hook"

        assert tls_handshake(env.lb.address, ssl.TLSVersion.TLSv1_2) == "TLSv1.2"
        for old in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
            assert "ALERT_PROTOCOL_VERSION" in tls_handshake(env.lb.address, old)
        _, out = env.lb.exec("stat -c %a /etc/nginx/tls/dify.key; "
                             "openssl x509 -noout -subject -in /etc/nginx/tls/dify.crt")
        assert out.split()[0] == "600" and "CN = dify.lab" in out
        fingerprint = env.lb.exec("sha256sum /etc/nginx/tls/dify.crt")[1]

        second = env.deploy()
        assert second.split("summary:")[1].split()[:2] == ["host", "unchanged"], second
        assert env.lb.exec("sha256sum /etc/nginx/tls/dify.crt")[1] == fingerprint
        check = env.inv("lb.check")
        assert check.returncode == 0, check.stdout + check.stderr
    finally:
        env.write_inventory()


def test_tls_certificate_from_files(env: Lb, tmp_path: Path) -> None:
    cert, key = tmp_path / "shipped.crt", tmp_path / "shipped.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=dify.lab", "-keyout", str(key), "-out", str(cert)],
                   capture_output=True, check=True, timeout=60)
    env.write_inventory(tls={"mode": "file", "cert_file": str(cert), "key_file": str(key)})
    try:
        out = env.deploy()
        assert "file /etc/nginx/tls/dify.key ... changed" in out
        assert "reload nginx for the new certificate ... changed" in out
        assert key.read_text() not in out
        served = ssl.get_server_certificate((env.lb.address, 443))
        assert ssl.PEM_cert_to_DER_cert(served) == ssl.PEM_cert_to_DER_cert(cert.read_text())
        assert env.lb.exec("stat -c '%a %U' /etc/nginx/tls/dify.key")[1].strip() == "600 root"
        second = env.deploy()
        assert second.split("summary:")[1].split()[:2] == ["host", "unchanged"], second
    finally:
        env.write_inventory()
        env.deploy()  # back to plain HTTP for whatever runs next
    assert env.get("/v1/whoami").json()["role"] == "api"


def test_a_client_can_neither_pose_as_another_nor_hammer_the_sign_in(env: Lb) -> None:
    answer = env.get("/v1/whoami", headers={"X-Forwarded-For": "203.0.113.9"})
    assert answer.headers["Server"] == "nginx"  # no version
    seen = answer.json()["headers"]
    assert seen["X-Forwarded-For"] == seen["X-Real-IP"] != "203.0.113.9", seen

    def received() -> int:
        return posts(env.up1, "/console/api/login") + posts(env.up2, "/console/api/login")

    before = received()
    # 10 a minute per client with a burst of 10: the first 11 pass, the rest get 429 at once
    codes = [requests.post(f"{env.url}/console/api/login", json={}, timeout=15).status_code
             for _ in range(20)]
    assert 429 not in codes[:11] and codes[-5:] == [429] * 5, codes
    assert received() - before == 20 - codes.count(429)
    # the setup status a health check reads is a GET: never limited
    assert [env.get("/console/api/setup").status_code for _ in range(15)].count(429) == 0


def tls_handshake(address: str, version: ssl.TLSVersion) -> str:
    """The protocol a handshake at exactly that version agreed, or the error it ended with."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client offer the old protocols
        context.minimum_version = context.maximum_version = version
    try:
        with socket.create_connection((address, 443), timeout=10) as raw, \
                context.wrap_socket(raw) as tls:
            return tls.version() or ""
    except (ssl.SSLError, OSError) as exc:
        return repr(exc)


def test_maintenance_answers_503_and_its_page_except_to_management_until_off(env: Lb) -> None:
    env.write_inventory(net={"firewall": "off", "management": [env.up1.address]})
    try:
        env.deploy()
        on = env.inv("lb.maintenance", "on", "--message", "Back at 10:00 <UTC> & later")
        assert on.returncode == 0, on.stdout + on.stderr
        page = env.get("/apps")
        assert page.status_code == 503 and page.headers["Retry-After"] == "300", page.headers
        assert page.headers["Content-Type"].startswith("text/html")
        assert "<p>Back at 10:00 &lt;UTC&gt; &amp; later</p>" in page.text, page.text
        answer = env.get("/v1/whoami")
        assert answer.status_code == 503
        assert answer.headers["Content-Type"].startswith("application/json")
        assert answer.json() == {"code": "maintenance", "status": 503,
                                 "message": "Back at 10:00 <UTC> & later"}
        assert env.get("/health").status_code == 200  # the balancer itself is up
        curl = "curl -s -o /dev/null -w '%{http_code}' " + f"{env.url}/v1/whoami"
        assert env.up1.exec(curl)[1] == "200"  # net.management gets through
        assert env.up2.exec(curl)[1] == "503"
        # A deploy keeps the mode, and the status shows it.
        env.deploy()
        assert env.get("/v1/whoami").status_code == 503
        status = env.inv("lb.status")
        assert re.search(r"^lbx\s.*\bon since 20\d\d-", status.stdout, re.M), status.stdout
        overall = env.inv("deploy.status", "--only", "lb")
        assert re.search(r"^lbx: maintenance on since 20\d\d-", overall.stdout, re.M), \
            overall.stdout + overall.stderr
        off = env.inv("lb.maintenance", "off")
        assert off.returncode == 0 and re.search(r"^lbx\s+off\s+yes$", off.stdout, re.M), \
            off.stdout + off.stderr
        env.both_answer()
        status = env.inv("lb.status")
        assert re.search(r"^lbx\s+active\s+200\s+yes\s+off\s+ok$", status.stdout, re.M), \
            status.stdout
    finally:
        env.inv("lb.maintenance", "off")
        env.write_inventory()
        env.deploy()
