"""Benchmark: small responses through difyops's nginx, the original plan's nginx, and direct.

One lab host (a container, as in the integration tests) runs three things on loopback: a backend
answering a small JSON body on 127.0.0.1:5001 (nginx `return`, so the backend is never the
bottleneck), difyops's rendered site on :8081 and the original plan's site on :8082, both in
front of that backend. wrk loads each in turn with the same settings and prints requests per
second, p50/p99 latency, and how many TCP connections the backend saw (upstream keepalive at
work, or not: the plan's upstream `keepalive` has no effect without HTTP/1.1).

Needs a Docker engine. Prints figures; asserts nothing. Run: python benchmarks/lb.py
[--seconds N] [--connections N]
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BACKEND = """
log_format bench_conn '$connection';
server {
    listen 127.0.0.1:5001;
    access_log /var/log/nginx/bench-backend.log bench_conn;
    location / { default_type application/json; return 200 '{"result":"ok"}'; }
}
"""

# The original plan's site, as written there, with its hosts on this machine and plain HTTP on
# :8082 (the TLS part is the same cost for both sites and is left out of both).
PLAN = """
log_format plan_main '$remote_addr - $remote_user [$time_local] "$request" '
                '$status $body_bytes_sent "$http_referer" '
                '"$http_user_agent" "$http_x_forwarded_for" '
                'rt=$request_time uct="$upstream_connect_time" '
                'uht="$upstream_header_time" urt="$upstream_response_time"';
upstream api_backend {
    least_conn;
    server 127.0.0.1:5001 max_fails=3 fail_timeout=30s;
    keepalive 32;
}
server {
    listen 8082;
    server_name plan.bench;
    access_log /var/log/nginx/plan-access.log plan_main;
    client_max_body_size 100M;
    gzip on;
    gzip_vary on;
    gzip_min_length 1024;
    location /api/ {
        proxy_pass http://api_backend;
        proxy_set_header Host $host;
        proxy_set_header X-Real-IP $remote_addr;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        proxy_set_header X-Forwarded-Proto $scheme;
        proxy_read_timeout 300s;
        proxy_send_timeout 300s;
        proxy_connect_timeout 10s;
        proxy_next_upstream error timeout invalid_header http_500 http_502 http_503 http_504;
        proxy_next_upstream_tries 2;
        proxy_next_upstream_timeout 10s;
    }
}
"""


def difyops_site() -> str:
    """The lb tier's site for a one-host inventory on 127.0.0.1, listening on :8081."""
    import yaml

    from tasks.core.inventory import load_inventory
    from tasks.core.render import Renderer
    from tasks.tiers import lb

    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "bench.yml"
        path.write_text(yaml.safe_dump({"name": "bench", "domain": "difyops.bench",
                                        "cache": {"mode": "standalone"},
                                        "hosts": [{"name": "bench", "connection": "local",
                                                   "roles": ["db_primary", "cache", "vector",
                                                             "api", "worker", "beat", "web",
                                                             "plugin_daemon", "lb"]}]}))
        inventory = load_inventory(path, check_secrets=False)
        site = Renderer(inventory).render("nginx/dify.conf.j2", inventory.host("bench"),
                                          upstreams=lb.upstreams(inventory))
    site = site.replace("    listen [::]:80;\n", "")
    return site.replace("    listen 80;\n", "    listen 8081;\n")


def wrk(host, url: str, seconds: int, connections: int) -> dict[str, str]:
    """One wrk run: requests/s, p50, p99 and errors, as wrk printed them."""
    host.exec(": > /var/log/nginx/bench-backend.log")
    code, out = host.exec(f"wrk -t2 -c{connections} -d{seconds}s --latency {url}")
    if code != 0:
        raise SystemExit(f"wrk failed on {url}: {out}")
    figures = {"rps": re.search(r"Requests/sec:\s+(\S+)", out).group(1),
               "p50": re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1),
               "p99": re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1)}
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    figures["non-2xx"] = errors.group(1) if errors else "0"
    _, count = host.exec("sort -u /var/log/nginx/bench-backend.log | wc -l")
    figures["backend connections"] = count.strip()
    return figures


def main() -> None:
    """Start the host, install nginx and wrk, measure and print."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10, help="length of each wrk run")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections")
    args = parser.parse_args()
    from tests.integration.lab import Lab

    with Lab() as lab:
        (host,) = lab.start(["lbbench"])
        code, out = host.exec("export DEBIAN_FRONTEND=noninteractive; apt-get update -q && "
                              "apt-get install -y -q --no-install-recommends nginx wrk")
        if code != 0:
            raise SystemExit(f"cannot install nginx and wrk: {out[-500:]}")
        files = {"/etc/nginx/sites-enabled/default": None,
                 "/etc/nginx/sites-enabled/bench-backend.conf": BACKEND,
                 "/etc/nginx/sites-enabled/dify.conf": difyops_site(),
                 "/etc/nginx/sites-enabled/plan.conf": PLAN}
        for path, text in files.items():
            if text is None:
                host.exec(f"rm -f {path}")
            else:
                host.exec(f"cat > {path} <<'DIFYOPS_BENCH_EOF'\n{text}\nDIFYOPS_BENCH_EOF")
        code, out = host.exec("nginx -t && systemctl reload nginx")
        if code != 0:
            raise SystemExit(f"nginx refused the benchmark sites: {out}")
        runs = {"direct to the backend": "http://127.0.0.1:5001/api/bench",
                "difyops nginx": "http://127.0.0.1:8081/api/bench",
                "original plan's nginx": "http://127.0.0.1:8082/api/bench"}
        wrk(host, runs["difyops nginx"], 2, args.connections)  # warm up
        results = {name: wrk(host, url, args.seconds, args.connections)
                   for name, url in runs.items()}
    print(f"wrk -t2 -c{args.connections} -d{args.seconds}s, small JSON answers, loopback in one "
          f"lab host")
    width = max(len(name) for name in results)
    print(f"{'path':{width}}  {'requests/s':>10}  {'p50':>8}  {'p99':>8}  {'non-2xx':>7}  "
          f"backend connections")
    for name, figures in results.items():
        print(f"{name:{width}}  {figures['rps']:>10}  {figures['p50']:>8}  {figures['p99']:>8}  "
              f"{figures['non-2xx']:>7}  {figures['backend connections']}")


if __name__ == "__main__":
    main()
