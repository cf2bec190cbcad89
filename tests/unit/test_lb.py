"""The lb tier without hosts: the rendered site parsed, exact commands, publish run for real in a
temporary folder, drain/undrain/status/check against in-memory machines."""

from __future__ import annotations

import datetime
import io
import re
import subprocess
from pathlib import Path

import pytest
from dotenv import dotenv_values

from tasks.core.errors import DifyopsError, HostError, InputError
from tasks.core.hosts import Result
from tasks.core.inventory import Inventory
from tasks.core.plan import RunCommand, WriteFile
from tasks.core.tiers import build
from tasks.tiers import TIERS, lb, lb_ops
from tests.unit.fakes import FakeMachine

SECURITY = ("X-Content-Type-Options", "Referrer-Policy", "X-Frame-Options")
PROXY = ("Host", "X-Real-IP", "X-Forwarded-For", "X-Forwarded-Proto")


# --- parsing helpers ----------------------------------------------------------------------------


def rendered(inventory: Inventory, path: str = lb.AVAILABLE, host: str = "lb1") -> str:
    return {(p.host.name, s.path): s.content for t in build(TIERS, inventory) for p in t.hosts
            for s in p.files()}[(host, path)]


def blocks(text: str, opener: str) -> list[tuple[str, str]]:
    """(header, body) of every `opener ... {` block, braces matched (quotes ignored)."""
    found = []
    for match in re.finditer(rf"^\s*({opener}[^{{\n]*)\{{", text, re.M):
        depth, index = 1, match.end()
        while depth:
            depth += {"{": 1, "}": -1}.get(text[index], 0)
            index += 1
        found.append((match.group(1).strip(), text[match.end():index - 1]))
    return found


def locations(server: str) -> dict[str, str]:
    return {header.split()[-1]: body for header, body in blocks(server, "location ")}


def server_level(server: str) -> str:
    """A server block's own directives, its locations cut out."""
    for _, body in blocks(server, "location "):
        server = server.replace(body, "")
    return server


def main_server(site: str) -> str:
    return next(body for _, body in blocks(site, "server") if "proxy_pass" in body)


def header_names(body: str, directive: str) -> list[str]:
    return re.findall(rf"^\s*{directive} (\S+) ", body, re.M)


# --- rendered facts -----------------------------------------------------------------------------


def upstream_blocks(site: str) -> dict[str, str]:
    return {header.split()[1]: body for header, body in blocks(site, "upstream ")}


def test_every_route_goes_to_its_upstream_with_websocket(load, base) -> None:
    inventory = load(base)  # Dify 1.16.1, app.collaboration true by default
    site = rendered(inventory)
    found = {prefix: re.search(r"proxy_pass http://(\w+);", body).group(1)
             for prefix, body in locations(main_server(site)).items()
             if "proxy_pass" in body}
    assert found == {**dict.fromkeys(("/console/api", "/api", "/v1", "/files", "/mcp",
                                      "/triggers", "/openapi", SIGN_IN), "dify_api"),
                     "/socket.io/": "dify_websocket",
                     "/e/": "dify_plugin_daemon",
                     **dict.fromkeys(("/_next/static/", "/explore", "/"), "dify_web")}
    socket_io = locations(main_server(site))["/socket.io/"]
    assert "proxy_set_header Upgrade $http_upgrade;" in socket_io
    assert re.findall(r"proxy_set_header Connection (.+);", socket_io) == ['"upgrade"']
    assert "proxy_http_version 1.1;" in socket_io
    assert "proxy_read_timeout 3600s;" in socket_io and "proxy_send_timeout 3600s;" in socket_io
    # Both api hosts' api_websocket, sticky by client address (declared before keepalive).
    websocket = upstream_blocks(site)["dify_websocket"]
    assert re.findall(r"^\s*server (\S+) ", websocket, re.M) == ["10.0.2.21:5006",
                                                                 "10.0.2.22:5006"]
    assert websocket.index("hash $remote_addr consistent;") < websocket.index("server ")
    assert websocket.index("server ") < websocket.index("keepalive 32;")
    assert "hash " not in upstream_blocks(site)["dify_api"]


SIGN_IN = ("^/(console/)?api/(login|setup|init|forgot-password|email-code-login|email-register|"
           "reset-password|activate)(/|$)")


def test_sign_in_posts_are_limited_per_client_and_other_methods_are_not(load, base) -> None:
    site = rendered(load(base))
    assert ("map $request_method $dify_sign_in_client {\n    POST    $binary_remote_addr;\n"
            '    default "";\n}') in site
    assert "limit_req_zone $dify_sign_in_client zone=dify_sign_in:10m rate=10r/m;" in site
    assert site.index("limit_req_zone") < site.index("server {")
    limited = locations(main_server(site))[SIGN_IN]
    assert "limit_req zone=dify_sign_in burst=10 nodelay;" in limited
    assert "limit_req_status 429;" in limited
    assert [p for p, body in locations(main_server(site)).items() if "limit_req" in body] \
        == [SIGN_IN]
    base["lb"] = {"sign_in_rate_per_minute": 0}
    assert "limit_req" not in rendered(load(base))


def test_nginx_names_no_version_and_replaces_a_client_forwarded_for(load, base) -> None:
    site = rendered(load(base))
    server = main_server(site)
    assert "server_tokens off;" in server_level(server)
    assert "$proxy_add_x_forwarded_for" not in site
    assert site.count("proxy_set_header X-Forwarded-For $remote_addr;") == \
        site.count("proxy_set_header X-Real-IP $remote_addr;") >= 2
    assert "real_ip_header" not in site


def test_behind_trusted_proxies_the_client_is_the_address_they_name(load, base) -> None:
    base["lb"] = {"trusted_proxies": ["203.0.113.0/24", "198.51.100.7"]}
    server = server_level(main_server(rendered(load(base))))
    assert re.findall(r"set_real_ip_from (\S+);", server) == ["203.0.113.0/24",
                                                               "198.51.100.7/32"]
    assert "real_ip_header X-Forwarded-For;" in server and "real_ip_recursive on;" in server


def test_one_websocket_host_is_not_hashed_and_the_port_is_a_setting(load, base) -> None:
    base["hosts"] = [h for h in base["hosts"] if h["name"] != "api2"]
    base["app"] = {"websocket_port": 5016}
    websocket = upstream_blocks(rendered(load(base)))["dify_websocket"]
    assert re.findall(r"^\s*server (\S+) ", websocket, re.M) == ["10.0.2.21:5016"]
    assert "hash" not in websocket and "ip_hash" not in websocket


@pytest.mark.parametrize("change", [
    lambda b: b.update(app={"collaboration": False}),
    lambda b: b.update(dify={"version": "1.13.3"})], ids=["collaboration-off", "release-1.13.3"])
def test_no_socket_io_route_without_api_websocket(load, base, change) -> None:
    change(base)
    inventory = load(base)
    site = rendered(inventory)
    assert "/socket.io/" not in locations(main_server(site))
    assert "dify_websocket" not in upstream_blocks(site) and "dify_websocket" not in site
    assert "/socket.io/" not in [route for route, _, _ in lb.routes(inventory)]


@pytest.mark.parametrize("mode", ["off", "self-signed"])
def test_security_headers_survive_a_location_add_header(load, base, mode) -> None:
    base["tls"] = {"mode": mode}
    server = main_server(rendered(load(base)))
    wanted = header_names(server_level(server), "add_header")
    assert set(wanted) >= set(SECURITY)
    assert ("Strict-Transport-Security" in wanted) == (mode != "off")
    own = {prefix: body for prefix, body in locations(server).items() if "add_header" in body}
    assert own, "the test needs a location with an add_header of its own"
    for prefix, body in own.items():
        assert set(header_names(body, "add_header")) >= set(wanted), prefix


def test_proxy_headers_survive_a_location_proxy_set_header(load, base) -> None:
    server = main_server(rendered(load(base)))
    level = header_names(server_level(server), "proxy_set_header")
    assert set(level) >= {*PROXY, "Connection"}
    hook = locations(server)["/e/"]
    assert set(header_names(hook, "proxy_set_header")) >= {*PROXY, "Connection", "Dify-Hook-Url"}
    assert "proxy_set_header Dify-Hook-Url $scheme://$host$request_uri;" in hook
    for prefix, body in locations(server).items():
        names = header_names(body, "proxy_set_header")
        if names:
            assert set(names) >= set(PROXY) and names.count("Connection") == 1, prefix


def test_keepalive_and_failover_that_never_replays_a_post(load, base) -> None:
    base["lb"] = {"max_fails": 5, "fail_timeout": 9}
    site = rendered(load(base))
    server = server_level(main_server(site))
    assert "proxy_http_version 1.1;" in server and 'proxy_set_header Connection "";' in server
    retry = re.search(r"proxy_next_upstream ([^;]+);", server).group(1).split()
    assert "non_idempotent" not in retry and {"error", "timeout"} <= set(retry)
    for name, body in blocks(site, "upstream "):
        assert re.search(r"^\s*keepalive \d+;", body, re.M), name
        # Below the api's own idle timeout (gunicorn's default 2 s: test_dify_source).
        assert re.search(r"^\s*keepalive_timeout 1s;", body, re.M), name
        assert all("max_fails=5 fail_timeout=9s;" in line
                   for line in body.splitlines() if line.strip().startswith("server ")), name


def test_streaming_api_routes_and_gzip(load, base) -> None:
    server = main_server(rendered(load(base)))
    for prefix in ("/console/api", "/api", "/v1", "/files", "/mcp", "/triggers"):
        body = locations(server)[prefix]
        assert "proxy_buffering off;" in body and "proxy_read_timeout 3600s;" in body, prefix
    types = re.search(r"gzip_types ([^;]+);", server).group(1).split()
    assert "text/event-stream" not in types and "application/javascript" in types
    static = locations(server)["/_next/static/"]
    assert "proxy_hide_header Cache-Control;" in static
    assert 'add_header Cache-Control "public, max-age=31536000, immutable";' in static


def test_one_upload_limit_drives_nginx_and_dify(load, base) -> None:
    base["upload_limit_mb"] = 250
    inventory = load(base)
    assert "client_max_body_size 250m;" in main_server(rendered(inventory))
    env = dotenv_values(stream=io.StringIO(rendered(inventory, "/opt/dify/.env", "api1")))
    assert env["UPLOAD_FILE_SIZE_LIMIT"] == "250"


def test_tls_off_serves_plain_http_only(load, base) -> None:
    site = rendered(load(base))
    assert [header for header, _ in blocks(site, "server")] == ["server"]
    assert "listen 443" not in site and "Strict-Transport-Security" not in site


@pytest.mark.parametrize("mode", ["self-signed", "acme"])
def test_tls_redirects_http_and_allows_tls12_13_only(load, base, mode) -> None:
    base["tls"] = {"mode": mode, "acme_email": "ops@dify.test"}
    site = rendered(load(base))
    plain, secure = [body for _, body in blocks(site, "server")]
    assert "listen 80;" in plain and "listen 443" not in plain
    plain_locations = locations(plain)
    assert "return 301 https://$host$request_uri;" in plain_locations["/"]
    assert 'return 200 "ok\\n";' in plain_locations["/health"]
    assert ("/.well-known/acme-challenge/" in plain_locations) == (mode == "acme")
    if mode == "acme":
        assert "root /var/www/acme;" in plain_locations["/.well-known/acme-challenge/"]
    assert "listen 443 ssl http2;" in secure
    assert re.findall(r"ssl_protocols ([^;]+);", secure) == ["TLSv1.2 TLSv1.3"]
    assert f"ssl_certificate     {lb.CERT};" in secure
    assert f"ssl_certificate_key {lb.KEY};" in secure


def test_frame_options_can_be_left_out_for_embedding(load, base) -> None:
    base["lb"] = {"frame_options": ""}
    assert "X-Frame-Options" not in rendered(load(base))


def test_only_members_of_shared_upstreams_can_be_drained(load, base) -> None:
    site = rendered(load(base))
    servers = {name.split()[1]: [line.strip() for line in body.splitlines()
                                 if line.strip().startswith("server ")]
               for name, body in blocks(site, "upstream ")}
    assert [line.split("# host=")[1] for line in servers["dify_api"]] == ["api1", "api2"]
    assert servers["dify_web"] == ["server 10.0.2.11:3000 max_fails=3 fail_timeout=30s;"]
    assert servers["dify_plugin_daemon"] == ["server 10.0.2.21:5002 max_fails=3 fail_timeout=30s;"]


def test_ipv6_members_are_bracketed(load, base) -> None:
    base["hosts"][3]["address"] = "fd00::22"
    assert "server [fd00::22]:5001 " in rendered(load(base))


def test_a_role_without_hosts_is_refused(load, base) -> None:
    inventory = load(base)
    inventory.hosts = [h for h in inventory.hosts if not h.has("web")]
    with pytest.raises(InputError, match="needs a host with role 'web'"):
        lb.upstreams(inventory)


# --- plan and exact commands --------------------------------------------------------------------


def lb_steps(inventory: Inventory) -> list:
    return lb.TIER.plan(inventory).hosts[0].steps


def labels(steps: list) -> list[str]:
    return [step.label for step in steps]


def test_the_site_is_rendered_then_published_past_nginx_t(load, base) -> None:
    steps = lb_steps(load(base))
    names = labels(steps)
    publish = next(s for s in steps if isinstance(s, RunCommand) and s.name.startswith("publish"))
    assert names.index(f"file {lb.AVAILABLE}") < names.index(publish.name) \
        < names.index("enable and start nginx") < names.index("health nginx /health")
    assert publish.on_change == (lb.AVAILABLE,) and publish.unless is None
    assert publish.command == lb.publish_command()
    assert all(not (isinstance(s, WriteFile) and s.path == lb.LIVE) for s in steps)
    assert "apt-get install -y -q --no-install-recommends nginx curl iproute2" in steps[0].command


def test_self_signed_is_made_on_the_host_only_when_absent(load, base) -> None:
    base["tls"] = {"mode": "self-signed"}
    step = next(s for s in lb_steps(load(base)) if s.label.startswith("self-signed"))
    assert step.unless == ("test -s /etc/nginx/tls/dify.key && openssl x509 -noout -checkhost "
                           "dify.test -in /etc/nginx/tls/dify.crt 2>/dev/null | "
                           "grep -q 'does match'")
    assert ("openssl req -x509 -newkey rsa:2048 -nodes -days 825 -subj /CN=dify.test "
            "-addext subjectAltName=DNS:dify.test -keyout /etc/nginx/tls/dify.key.new "
            "-out /etc/nginx/tls/dify.crt.new") in step.command
    assert "umask 077" in step.command and "chmod 0600 /etc/nginx/tls/dify.key.new" in step.command
    assert lb.self_signed_probe("10.0.0.5").count("-checkip 10.0.0.5") == 1
    assert "subjectAltName=IP:10.0.0.5" in lb.self_signed_command("10.0.0.5")


def test_self_signed_command_makes_a_private_key_and_a_matching_certificate(tmp_path) -> None:
    command = lb.self_signed_command("dify.test").replace("/etc/nginx/tls", str(tmp_path))
    command = command.split(" && if systemctl")[0]  # no nginx here to reload
    subprocess.run(["sh", "-c", command], check=True, capture_output=True, timeout=60)
    assert oct((tmp_path / "dify.key").stat().st_mode & 0o777) == "0o600"
    probe = lb.self_signed_probe("dify.test").replace("/etc/nginx/tls", str(tmp_path))
    assert subprocess.run(["sh", "-c", probe], check=False).returncode == 0
    other = lb.self_signed_probe("other.test").replace("/etc/nginx/tls", str(tmp_path))
    assert subprocess.run(["sh", "-c", other], check=False).returncode == 1


def test_acme_runs_certbot_through_the_webroot(load, base) -> None:
    base["tls"] = {"mode": "acme", "acme_email": "ops@dify.test"}
    steps = lb_steps(load(base))
    assert "certbot" in steps[0].command and "openssl" in steps[0].command
    by_label = {s.label: s for s in steps}
    placeholder = by_label["placeholder certificate for dify.test (until ACME issues one)"]
    assert placeholder.unless == ("test -s /etc/nginx/tls/dify.key && "
                                  "test -s /etc/nginx/tls/dify.crt")
    certbot = by_label["ACME certificate for dify.test (certbot, http-01)"]
    install = ("install -m 0644 /etc/letsencrypt/live/dify.test/fullchain.pem "
               "/etc/nginx/tls/dify.crt && "
               "install -m 0600 /etc/letsencrypt/live/dify.test/privkey.pem "
               "/etc/nginx/tls/dify.key && nginx -t -q && systemctl reload nginx")
    assert certbot.command == (
        "certbot certonly --webroot -w /var/www/acme -d dify.test --cert-name dify.test "
        "--email ops@dify.test --agree-tos --non-interactive --keep-until-expiring "
        f"--deploy-hook '{install}' && {install}")
    assert certbot.unless == "cmp -s /etc/letsencrypt/live/dify.test/fullchain.pem " \
                             "/etc/nginx/tls/dify.crt"
    names = labels(steps)
    assert names.index(placeholder.label) < names.index("enable and start nginx") \
        < names.index(certbot.label)


def make_pair(folder: Path, name: str) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "dify.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(1).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    cert_file, key_file = folder / f"{name}.crt", folder / f"{name}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


def test_file_mode_ships_the_pair_with_a_private_key(load, base, tmp_path) -> None:
    cert, key = make_pair(tmp_path, "site")
    base["tls"] = {"mode": "file", "cert_file": "site.crt", "key_file": str(key)}
    steps = lb_steps(load(base))  # cert_file relative to the inventory's folder
    files = {s.path: s for s in steps if isinstance(s, WriteFile)}
    assert files[lb.KEY].content == key.read_text()
    assert (files[lb.KEY].mode, files[lb.KEY].secret) == (0o600, True)
    assert files[lb.CERT].content == cert.read_text() and files[lb.CERT].secret
    reload = next(s for s in steps if s.label == "reload nginx for the new certificate")
    assert reload.on_change == (lb.CERT, lb.KEY)
    names = labels(steps)
    assert names.index(f"file {lb.KEY}") < names.index(f"file {lb.AVAILABLE}")


def test_file_mode_refuses_a_key_of_another_certificate(load, base, tmp_path) -> None:
    cert, _ = make_pair(tmp_path, "site")
    _, other = make_pair(tmp_path, "other")
    base["tls"] = {"mode": "file", "cert_file": str(cert), "key_file": str(other)}
    with pytest.raises(InputError, match=r"tls\.key_file: .*other\.key is not the key of the "
                                         r"certificate"):
        lb_steps(load(base))
    base["tls"]["key_file"] = str(tmp_path / "missing.key")
    with pytest.raises(InputError, match=r"tls\.key_file: cannot read .*missing\.key"):
        lb_steps(load(base))


# --- publish, run for real on this machine ------------------------------------------------------

SOURCE = """upstream dify_api {
    server 10.0.0.1:5001 max_fails=3 fail_timeout=30s; # host=api1
    server 10.0.0.2:5001 max_fails=3 fail_timeout=30s; # host=api2
}
upstream dify_plugin_daemon {
    server 10.0.0.1:5002 max_fails=3 fail_timeout=30s;
}
"""


class Box:
    """A folder standing in for /etc/nginx and /var/lib/difyops, with a fake `nginx -t`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        for folder in ("sites-available", "sites-enabled", "state"):
            (root / folder).mkdir()
        self.available = root / "sites-available" / "dify.conf"
        self.live = root / "sites-enabled" / "dify.conf"
        self.state = root / "state" / "drained"
        self.reloads = root / "reloads"
        nginx = root / "nginx-t"
        nginx.write_text(f"""#!/bin/sh
if grep -q BROKEN {self.live}; then
  echo 'nginx: [emerg] unknown directive "BROKEN" in {self.live}:2' >&2
  echo 'nginx: configuration file /etc/nginx/nginx.conf test failed' >&2; exit 1
fi
echo 'nginx: configuration file /etc/nginx/nginx.conf test is successful' >&2
""")
        nginx.chmod(0o755)
        self.test = str(nginx)

    def publish(self, source: Path | None = None) -> subprocess.CompletedProcess:
        command = lb.publish_command(str(source or self.available), live=str(self.live),
                                     work=str(self.root / "work"), state=str(self.state),
                                     test=self.test, reload=f"echo reload >> {self.reloads}")
        return subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=30,
                              check=False)

    def reload_count(self) -> int:
        return len(self.reloads.read_text().splitlines()) if self.reloads.exists() else 0


@pytest.fixture
def box(tmp_path) -> Box:
    return Box(tmp_path)


def test_publish_installs_once_and_reloads_only_on_a_change(box) -> None:
    box.available.write_text(SOURCE)
    first = box.publish()
    assert (first.returncode, first.stdout.strip()) == (0, "published"), first.stderr
    assert box.live.read_text() == SOURCE and box.reload_count() == 1
    again = box.publish()
    assert (again.returncode, again.stdout.strip(), box.reload_count()) == (0, "unchanged", 1)


def test_publish_marks_drained_hosts_down_and_back(box) -> None:
    box.available.write_text(SOURCE)
    box.state.write_text("api2\n")
    assert box.publish().returncode == 0
    live = box.live.read_text()
    assert "server 10.0.0.2:5001 max_fails=3 fail_timeout=30s down; # host=api2" in live
    assert "server 10.0.0.1:5001 max_fails=3 fail_timeout=30s; # host=api1" in live
    assert "server 10.0.0.1:5002 max_fails=3 fail_timeout=30s;\n" in live  # untagged: never
    box.state.write_text("")
    assert box.publish(box.live).returncode == 0  # undrain works from the live file itself
    assert box.live.read_text() == SOURCE and box.reload_count() == 2


def test_publish_refused_by_nginx_keeps_the_previous_site(box) -> None:
    box.available.write_text(SOURCE)
    assert box.publish().returncode == 0
    box.available.write_text(SOURCE.replace("upstream dify_plugin_daemon", "BROKEN;\nupstream x"))
    refused = box.publish()
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines()[-1] == (
        'nginx -t refused the new site; the previous one stays live: nginx: [emerg] unknown '
        f'directive "BROKEN" in {box.live}:2')
    assert box.live.read_text() == SOURCE and box.reload_count() == 1
    assert sorted(p.name for p in box.live.parent.iterdir()) == ["dify.conf"]


def test_a_first_site_refused_by_nginx_is_removed(box) -> None:
    box.available.write_text("BROKEN;\n")
    assert box.publish().returncode == 1
    assert not box.live.exists() and box.reload_count() == 0


def test_publish_replaces_a_symlinked_live_site_without_writing_through_it(box) -> None:
    box.available.write_text(SOURCE)
    box.live.symlink_to(box.available)
    box.state.write_text("api1\n")
    assert box.publish().returncode == 0
    assert not box.live.is_symlink() and "down; # host=api1" in box.live.read_text()
    assert box.available.read_text() == SOURCE


def test_publish_without_a_site_says_to_deploy_first(box) -> None:
    result = box.publish()
    assert result.returncode == 1 and "deploy the lb tier first (inv lb.deploy)" in result.stderr


# --- drain and undrain --------------------------------------------------------------------------


class LbMachine(FakeMachine):
    """A fake lb host: `ss` answers from a queue, publish exits with `publish_exit`."""

    def __init__(self, host, connections: list[str] | None = None) -> None:
        super().__init__(host)
        self.connections = connections or []
        self.publish_exit = 0
        self.published = b""  # the drain state the live site was last published with

    def _execute(self, command: str, timeout: float) -> Result:
        self.commands.append(command)
        if command.startswith("ss -Htn"):
            return Result(0, self.connections.pop(0) if self.connections else "", "")
        if command == lb.publish_command(lb.LIVE):
            if self.publish_exit:
                return Result(1, "", "nginx -t refused the new site; the previous one stays "
                                     "live: nginx: [emerg] boom")
            state = self.files.get(lb.DRAINED, (b"",))[0]
            changed, self.published = state != self.published, state
            return Result(0, "published\n" if changed else "unchanged\n", "")
        return Result(0, "", "")


@pytest.fixture
def lbs(load, base, use_machines):
    base["hosts"].insert(1, {"name": "lb2", "address": "10.0.1.11", "roles": ["lb"]})
    inventory = load(base)
    machines = {h.name: LbMachine(h) for h in inventory.with_role("lb")}
    connected: list[str] = []

    def connect(host, timeouts=None):
        connected.append(host.name)
        return machines[host.name]

    use_machines(connect)
    return inventory, machines, connected


def drained(machine: FakeMachine) -> str:
    return machine.files[lb.DRAINED][0].decode() if lb.DRAINED in machine.files else ""


@pytest.mark.parametrize(("name", "message"), [
    ("nosuch", "no host named 'nosuch'"),
    ("db1", r"db1 is not behind the load balancer \(roles: db_primary, cache\)")])
def test_drain_refuses_unknown_hosts_before_connecting(lbs, name, message) -> None:
    inventory, _, connected = lbs
    with pytest.raises(InputError, match=message):
        lb_ops.drain(inventory, name)
    assert connected == []


def test_drain_takes_the_host_out_everywhere_then_changes_nothing(lbs) -> None:
    inventory, machines, _ = lbs
    results = lb_ops.drain(inventory, "api1", wait=0)
    assert [(r.lb, r.changed, r.upstreams, r.kept_in) for r in results] == [
        ("lb1", True, ("dify_api", "dify_websocket"), ("dify_plugin_daemon",)),
        ("lb2", True, ("dify_api", "dify_websocket"), ("dify_plugin_daemon",))]
    assert all(drained(m) == "api1\n" for m in machines.values())
    assert all(lb.publish_command(lb.LIVE) in m.commands for m in machines.values())
    for machine in machines.values():
        machine.commands.clear()
    again = lb_ops.drain(inventory, "api1", wait=0)
    assert [(r.changed, r.upstreams) for r in again] == [
        (False, ("dify_api", "dify_websocket"))] * 2
    assert all(drained(m) == "api1\n" for m in machines.values())


def test_drain_refuses_to_empty_an_upstream(lbs) -> None:
    inventory, machines, _ = lbs
    machines["lb2"].files[lb.DRAINED] = (b"api1\n", 0o644, "root", "root")
    with pytest.raises(DifyopsError, match="draining api2 would leave dify_api on lb2 with no "
                                           r"server in service \(api1 drained already\)"):
        lb_ops.drain(inventory, "api2", wait=0)
    assert drained(machines["lb1"]) == "" and drained(machines["lb2"]) == "api1\n"
    assert not any(c.startswith("set -u") for m in machines.values() for c in m.commands)


def test_a_refused_publish_puts_the_drain_state_back(lbs) -> None:
    inventory, machines, _ = lbs
    machines["lb2"].publish_exit = 1
    with pytest.raises(HostError, match=r"drain api2: lb2: lb2 \(root@10\.0\.1\.11:22\): cannot "
                                        r"publish the site: .*\[emerg\] boom \(done on lb1\)"):
        lb_ops.drain(inventory, "api2", wait=0)
    assert drained(machines["lb1"]) == "api2\n" and drained(machines["lb2"]) == ""


def test_drain_waits_for_connections_to_the_host_to_close(lbs) -> None:
    inventory, machines, _ = lbs
    busy = "0 0 10.0.1.10:40000 10.0.2.22:5001\n0 0 10.0.1.10:40002 10.0.2.99:5001\n"
    machines["lb1"].connections = [busy, busy, "0 0 10.0.1.10:40002 10.0.2.99:5001\n"]
    now = [0.0]
    results = lb_ops.drain(inventory, "api2", wait=30, clock=lambda: now[0],
                       pause=lambda s: now.__setitem__(0, now[0] + s))
    assert [(r.lb, r.open_connections, r.waited) for r in results] == [("lb1", 0, 1.0),
                                                                      ("lb2", 0, 0.0)]


def test_drain_fails_when_requests_are_still_in_flight_at_the_deadline(lbs) -> None:
    inventory, machines, _ = lbs
    machines["lb1"].connections = ["0 0 10.0.1.10:40000 10.0.2.22:5001\n"] * 100
    now = [0.0]
    with pytest.raises(HostError, match=r"lb1: api2 is out of rotation but 1 connection\(s\) to "
                                        r"it are still open after 5 s"):
        lb_ops.drain(inventory, "api2", wait=5, clock=lambda: now[0],
                 pause=lambda s: now.__setitem__(0, now[0] + s))


def test_undrain_puts_the_host_back(lbs) -> None:
    inventory, machines, _ = lbs
    for machine in machines.values():
        machine.files[lb.DRAINED] = (b"web1\napi2\n", 0o644, "root", "root")
    results = lb_ops.undrain(inventory, "api2")
    assert [r.upstreams for r in results] == [("dify_api", "dify_websocket")] * 2
    assert all(drained(m) == "web1\n" for m in machines.values())


# --- status and check ---------------------------------------------------------------------------


def test_live_servers_name_hosts_and_drains(load, base) -> None:
    inventory = load(base)
    site = rendered(inventory).replace("; # host=api2", " down; # host=api2")
    servers = lb_ops.live_servers(site, inventory)
    assert [(s.upstream, s.host, s.endpoint, s.down) for s in servers] == [
        ("dify_api", "api1", "10.0.2.21:5001", False),
        ("dify_api", "api2", "10.0.2.22:5001", True),
        ("dify_web", "web1", "10.0.2.11:3000", False),
        ("dify_plugin_daemon", "api1", "10.0.2.21:5002", False),
        ("dify_websocket", "api1", "10.0.2.21:5006", False),
        ("dify_websocket", "api2", "10.0.2.22:5006", True)]


class CheckMachine(FakeMachine):
    """Answers the probe script with status codes and the log grep with access-log lines."""

    def __init__(self, host, codes: dict[str, str], log: str) -> None:
        super().__init__(host)
        self.codes, self.log = codes, log

    def _execute(self, command: str, timeout: float) -> Result:
        self.commands.append(command)
        if command.startswith("printf"):
            return Result(0, "".join(f"{p} {c}\n" for p, c in self.codes.items()), "")
        if command.startswith("grep -F"):
            return Result(0, self.log, "")
        return Result(0, "", "")


def log_line(path: str, status: int, upstream: str) -> str:
    return (f'10.0.1.10 - - [30/Nov/2026:14:00:00 +0000] "GET {path} HTTP/1.1" {status} 12 "-" '
            f'"difyops-check/x" "-" rt=0.002 uct="0.000" uht="0.002" urt="0.002" '
            f'upstream="{upstream}" ustatus="{status}"\n')


def test_check_names_who_answered_each_route(load, base) -> None:
    inventory = load(base)
    table = lb.routes(inventory)
    paths = [path for _, path, _ in table]
    assert paths[:2] == ["/console/api/difyops-check", "/api/difyops-check"]
    assert "/" in paths and "/e/difyops-check" in paths
    log = "".join(log_line(p, 404, "10.0.2.22:5001") for p in paths if p.startswith(
        ("/console", "/api", "/v1", "/files", "/mcp", "/triggers", "/openapi")))
    log += log_line("/e/difyops-check", 200, "10.0.2.21:5002")
    log += log_line("/socket.io/difyops-check", 404, "10.0.2.21:5006")
    log += log_line("/_next/static/difyops-check", 404, "10.0.2.11:3000")
    log += log_line("/explore/difyops-check", 200, "10.0.2.11:3000")
    log += log_line("/", 502, "10.0.2.11:3000")  # web broken
    machine = CheckMachine(inventory.host("lb1"), {"/health": "200", **dict.fromkeys(paths, "404"),
                                                   "/e/difyops-check": "200", "/": "502"}, log)
    probes = {p.path: p for p in lb_ops.check_on(inventory, machine)}
    assert probes["/health"].ok and probes["/v1/difyops-check"].answered_by == ("api2",)
    assert probes["/v1/difyops-check"].ok  # a 404 from the api: the route reached the api
    assert probes["/e/difyops-check"].answered_by == ("api1",)
    socket_io = probes["/socket.io/difyops-check"]
    assert socket_io.ok and socket_io.expected == "dify_websocket"
    assert socket_io.answered_by == ("api1",)
    assert not probes["/"].ok and [p for p, probe in probes.items() if not probe.ok] == ["/"]


def test_check_reads_retries_and_refuses_a_wrong_upstream(load, base) -> None:
    inventory = load(base)
    match = lb_ops.LOG_LINE.search(log_line("/v1/x?y=1", 200, "10.0.2.21:5001, 10.0.2.22:5001"))
    assert match["path"] == "/v1/x?y=1" and match["status"] == "200"
    paths = [path for _, path, _ in lb.routes(inventory)]
    log = "".join(log_line(p, 200, "10.0.2.21:5001, 10.0.2.11:3000") for p in paths)
    machine = CheckMachine(inventory.host("lb1"), dict.fromkeys(["/health", *paths], "200"), log)
    probes = {p.path: p for p in lb_ops.check_on(inventory, machine)}
    assert probes["/v1/difyops-check"].answered_by == ("api1", "web1")
    assert not probes["/v1/difyops-check"].ok  # answered by web: the route is wrong
    assert probes["/"].ok


def test_draining_the_only_server_of_every_upstream_records_nothing(lbs) -> None:
    inventory, machines, _ = lbs
    results = lb_ops.drain(inventory, "web1", wait=0)
    assert [(r.changed, r.upstreams, r.kept_in) for r in results] == [
        (False, (), ("dify_web",))] * 2
    assert all(drained(m) == "" for m in machines.values())
