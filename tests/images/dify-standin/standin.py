#!/usr/bin/env python3
"""A stand-in for Dify's images in difyops' integration tests: one program, every role.

The real images cannot be pulled where the tests run, so this program honours the contract the
deployment relies on: the same ports, health paths, MODE values and environment variable names.
The role comes from STANDIN_ROLE (set per image tag); the release it pretends to be from
STANDIN_VERSION, and its migration chain from STANDIN_REVISIONS (oldest first: the last is the
image's alembic head, which `flask db heads` prints).

- api image (STANDIN_ROLE=api), like Dify's entrypoint: MIGRATION_ENABLED=true runs `flask
  upgrade-db` first; MODE=migration then exits (only where STANDIN_MIGRATION_MODE=1, as in Dify
  releases that have that mode); MODE=worker / MODE=beat run a loop connected to the broker in
  CELERY_BROKER_URL (a worker announces its queues in the key standin:worker:<hostname>, beat in
  standin:beat); otherwise the api on :5001. GET /health answers "ok" only when the database and
  Redis named in the environment answer; GET /console/api/setup needs a migrated database.
- `flask upgrade-db` takes the Redis lock db_upgrade_lock as Dify does and, like Dify, exits 0
  when another process holds it ("Database migration skipped") or when the migration fails.
- web :3000 (GET /), plugin_daemon :5002 (refuses to start, as the real one, while remote
  installing is on without PLUGIN_REMOTE_INSTALLING_HOST and _PORT; at start it makes its table
  `plugins` in DB_DATABASE as DB_USERNAME, as the real one's migration does, and stops when it
  cannot; GET /health/check: its own database and Redis;
  /plugin/... only with X-Api-Key equal to SERVER_KEY, as the real daemon; an empty plugin list;
  POST /standin/inner/<route> makes the call the real daemon makes back to the api: POST
  DIFY_INNER_API_URL/inner/api/<route> with X-Inner-Api-Key: DIFY_INNER_API_KEY, and answers
  {"status": <the api's status>, "body": <its answer>}, so a test proves that URL and key work),
  sandbox :8194 (GET /health; POST /v1/sandbox/run only with X-Api-Key equal to API_KEY, as the
  real one: runs the preload and code it is sent with python3, answers {"code": 0, "data":
  {"stdout", "error"}}), ssrf_proxy :3128 (needs /etc/squid/squid.conf; refuses requests).
- agent_backend :5050 (Dify 1.16.1's DIFY_AGENT_* environment; the server secret must be 32
  bytes of unpadded base64url, as the real one insists). GET /openapi.json, the path difyops
  probes (the real server has no health route; FastAPI serves its schema), answers 200 only when
  the Redis of DIFY_AGENT_REDIS_URL and local_sandbox's /healthz answer: more than the real one
  checks, so that a test proves the wiring.
- local_sandbox :5004 (GET /healthz), with SHELLCTL_AUTH_TOKEN and its proxy in HTTP_PROXY.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

ROLE = os.environ.get("STANDIN_ROLE", "api")
VERSION = os.environ.get("STANDIN_VERSION", "0.0.0")
REVISIONS = os.environ.get("STANDIN_REVISIONS", "").split()
HOSTNAME = socket.gethostname()
LOCK = "db_upgrade_lock"
DEFAULT_QUEUES = "dataset,mail,ops_trace,app_deletion"
REQUIRED = {
    "api": ["SECRET_KEY", "DB_USERNAME", "DB_PASSWORD", "DB_HOST", "DB_PORT", "DB_DATABASE",
            "REDIS_HOST", "REDIS_PORT", "CELERY_BROKER_URL", "PLUGIN_DAEMON_URL",
            "PLUGIN_DAEMON_KEY", "INNER_API_KEY_FOR_PLUGIN", "CODE_EXECUTION_ENDPOINT",
            "CODE_EXECUTION_API_KEY", "STORAGE_TYPE"],
    "plugin_daemon": ["SERVER_KEY", "DIFY_INNER_API_URL", "DIFY_INNER_API_KEY", "DB_USERNAME",
                      "DB_PASSWORD", "DB_HOST", "DB_PORT", "DB_DATABASE", "REDIS_HOST",
                      "REDIS_PORT"],
    "sandbox": ["API_KEY"],
    "web": ["CONSOLE_API_URL", "APP_API_URL"],
    "ssrf_proxy": [],
    "agent_backend": ["DIFY_AGENT_REDIS_URL", "DIFY_AGENT_PLUGIN_DAEMON_URL",
                      "DIFY_AGENT_PLUGIN_DAEMON_API_KEY", "DIFY_AGENT_INNER_API_URL",
                      "DIFY_AGENT_INNER_API_KEY", "DIFY_AGENT_SHELLCTL_ENTRYPOINT",
                      "DIFY_AGENT_SHELLCTL_AUTH_TOKEN", "DIFY_AGENT_SERVER_SECRET_KEY",
                      "DIFY_AGENT_API_TOKEN"],
    "local_sandbox": ["SHELLCTL_AUTH_TOKEN", "HTTP_PROXY", "HTTPS_PROXY"],
}


def log(message: str) -> None:
    print(f"[standin {ROLE} {VERSION}] {message}", flush=True)


# --- Redis (RESP over a socket) ------------------------------------------------------------


class RedisError(Exception):
    pass


class Redis:
    """The few Redis commands the stand-in needs, without a client library."""

    def __init__(self, host: str, port: int, password: str = "", db: int = 0,
                 timeout: float = 3, username: str = "") -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.file = self.sock.makefile("rb")
        if password:  # AUTH [username] password: a Redis ACL user, else `default`
            self.call("AUTH", *filter(None, (username, password)))
        if db:
            self.call("SELECT", db)

    def close(self) -> None:
        self.sock.close()

    def call(self, *args: object):
        parts = [str(a).encode() for a in args]
        payload = b"*%d\r\n" % len(parts) + b"".join(
            b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
        self.sock.sendall(payload)
        return self.reply()

    def reply(self):
        line = self.file.readline()
        if not line:
            raise RedisError("connection closed")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RedisError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            if size < 0:
                return None
            data = self.file.read(size + 2)[:-2]
            return data.decode()
        if kind == b"*":
            size = int(rest)
            return None if size < 0 else [self.reply() for _ in range(size)]
        raise RedisError(f"unexpected reply {line!r}")


def sentinel_master(sentinels: list[tuple[str, int]], name: str, password: str) -> tuple[str, int]:
    """Ask each Sentinel in turn where the master of `name` is."""
    errors = []
    for host, port in sentinels:
        try:
            client = Redis(host, port, password)
            try:
                answer = client.call("SENTINEL", "get-master-addr-by-name", name)
            finally:
                client.close()
            if answer:
                return answer[0], int(answer[1])
        except (OSError, RedisError) as exc:
            errors.append(f"{host}:{port}: {exc}")
    raise RedisError(f"no Sentinel knows master {name!r}: {'; '.join(errors) or 'no answer'}")


def redis_from_env() -> Redis:
    """The Redis cache the api uses (REDIS_* names, standalone or Sentinel)."""
    env = os.environ
    password = env.get("REDIS_PASSWORD", "")
    db = int(env.get("REDIS_DB", "0") or 0)
    if env.get("REDIS_USE_SENTINEL", "").lower() == "true":
        sentinels = [(item.rsplit(":", 1)[0], int(item.rsplit(":", 1)[1]))
                     for item in env.get("REDIS_SENTINELS", "").split(",") if item]
        host, port = sentinel_master(sentinels, env.get("REDIS_SENTINEL_SERVICE_NAME", ""),
                                     env.get("REDIS_SENTINEL_PASSWORD", ""))
        return Redis(host, port, password, db, username=env.get("REDIS_USERNAME", ""))
    return Redis(env["REDIS_HOST"], int(env["REDIS_PORT"]), password, db,
                 username=env.get("REDIS_USERNAME", ""))


def broker_from_env() -> Redis:
    """The Celery broker of CELERY_BROKER_URL: redis://:pw@host:port/db or sentinel://...;..."""
    url = os.environ.get("CELERY_BROKER_URL", "")
    if not url:
        raise RedisError("CELERY_BROKER_URL is not set (Celery would look for a local RabbitMQ)")
    first = urlparse(url.split(";")[0])
    password = unquote(first.password or "")
    db = int((first.path or "/0").strip("/") or 0)
    if first.scheme == "sentinel":
        sentinels = [(urlparse(item).hostname, urlparse(item).port or 26379)
                     for item in url.split(";") if item]
        host, port = sentinel_master(sentinels,
                                     os.environ.get("CELERY_SENTINEL_MASTER_NAME", ""),
                                     os.environ.get("CELERY_SENTINEL_PASSWORD", ""))
        return Redis(host, port, password, db, username=unquote(first.username or ""))
    if first.scheme != "redis":
        raise RedisError(f"unsupported broker scheme {first.scheme!r}")
    return Redis(first.hostname, first.port or 6379, password, db,
                 username=unquote(first.username or ""))


# --- PostgreSQL ----------------------------------------------------------------------------


def database(name: str | None = None):
    import psycopg2

    env = os.environ
    # The daemon puts DB_SSL_MODE (disable|require, default disable) into its connection string,
    # over libpq's PGSSLMODE; Dify's api leaves the mode to libpq (PGSSLMODE, PGSSLROOTCERT).
    modes = {"sslmode": env.get("DB_SSL_MODE", "disable")} if ROLE == "plugin_daemon" else {}
    return psycopg2.connect(host=env["DB_HOST"], port=int(env["DB_PORT"]),
                            user=env["DB_USERNAME"], password=env["DB_PASSWORD"],
                            dbname=name or env["DB_DATABASE"], connect_timeout=3, **modes)


def migrate_plugin_database() -> str | None:
    """What the real daemon does at start (gorm's AutoMigrate, internal/db/init.go): make its
    tables in its database as its user. Why it could not, or None."""
    try:
        connection = database()
        try:
            with connection.cursor() as cursor:
                cursor.execute("CREATE TABLE IF NOT EXISTS plugins (id uuid PRIMARY KEY, "
                               "plugin_unique_identifier text)")
            connection.commit()
        finally:
            connection.close()
    except Exception as exc:
        return str(exc).strip() or repr(exc)
    return None


def current_revision(connection) -> str | None:
    """The revision in alembic_version, or None when the table does not exist or is empty."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT to_regclass('alembic_version') IS NOT NULL")
        if not cursor.fetchone()[0]:
            return None
        cursor.execute("SELECT version_num FROM alembic_version")
        row = cursor.fetchone()
        return row[0] if row else None


# --- flask commands ------------------------------------------------------------------------


def upgrade_db() -> int:
    """`flask upgrade-db` as Dify has it: under a Redis lock, exit 0 even when it did nothing."""
    try:
        lock = redis_from_env()
    except (OSError, RedisError) as exc:
        print(f"Failed to execute database migration: Redis: {exc}", file=sys.stderr)
        return 1
    try:
        if lock.call("SET", LOCK, HOSTNAME, "NX", "EX", 60) is None:
            print("Database migration skipped")
            return 0
        try:
            print("Starting database migration.")
            migrate()
            print("Database migration successful!")
        except Exception as exc:  # Dify logs the failure and still exits 0
            print(f"Failed to execute database migration: {exc}", file=sys.stderr)
        finally:
            if lock.call("GET", LOCK) == HOSTNAME:
                lock.call("DEL", LOCK)
        return 0
    finally:
        lock.close()


def migrate() -> None:
    connection = database()
    try:
        with connection, connection.cursor() as cursor:
            cursor.execute("CREATE TABLE IF NOT EXISTS alembic_version (version_num "
                           "VARCHAR(32) NOT NULL, CONSTRAINT alembic_version_pkc "
                           "PRIMARY KEY (version_num))")
            current = current_revision(connection)
            if current is not None and current not in REVISIONS:
                raise RuntimeError(f"Can't locate revision identified by '{current}'")
            todo = REVISIONS[REVISIONS.index(current) + 1:] if current else REVISIONS
            for revision in todo:
                # Each revision leaves a visible mark, as a real schema change would.
                cursor.execute(f"CREATE TABLE IF NOT EXISTS standin_{revision} (id INTEGER)")
                print(f"Running upgrade {current or ''} -> {revision}")
                current = revision
            cursor.execute("DELETE FROM alembic_version")
            cursor.execute("INSERT INTO alembic_version (version_num) VALUES (%s)",
                           (REVISIONS[-1],))
    finally:
        connection.close()


def flask(args: list[str]) -> int:
    if args == ["upgrade-db"]:
        return upgrade_db()
    if args == ["db", "heads"]:
        print(f"{REVISIONS[-1]} (head)")
        return 0
    if args == ["db", "current"]:
        connection = database()
        try:
            current = current_revision(connection)
        finally:
            connection.close()
        if current is None:
            return 0
        if current not in REVISIONS:
            print(f"ERROR [flask_migrate] Error: Can't locate revision identified by "
                  f"'{current}'", file=sys.stderr)
            return 1
        print(f"{current} (head)" if current == REVISIONS[-1] else current)
        return 0
    print(f"Error: No such command {' '.join(args)!r}.", file=sys.stderr)
    return 2


# --- HTTP roles ----------------------------------------------------------------------------


def check_dependencies(database_name: str | None = None) -> list[str]:
    """What does not answer among the database and Redis of the environment."""
    problems = []
    try:
        connection = database(database_name)
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1")
        finally:
            connection.close()
    except Exception as exc:
        problems.append(f"database: {str(exc).strip().splitlines()[0] if str(exc) else exc}")
    try:
        client = redis_from_env()
        try:
            if client.call("PING") != "PONG":
                problems.append("redis: no PONG")
        finally:
            client.close()
    except (OSError, RedisError, KeyError) as exc:
        problems.append(f"redis: {exc}")
    return problems


def api_routes(path: str) -> tuple[int, dict]:
    if path == "/health":
        problems = check_dependencies()
        if problems:
            return 503, {"status": "error", "problems": problems, "version": VERSION}
        return 200, {"pid": os.getpid(), "status": "ok", "version": VERSION}
    if path == "/console/api/setup":
        try:
            connection = database()
            try:
                revision = current_revision(connection)
            finally:
                connection.close()
        except Exception as exc:
            return 500, {"message": f"database: {exc}"}
        if revision is None:
            return 500, {"message": "relation \"dify_setups\" does not exist (not migrated)"}
        return 200, {"step": "not_started", "version": VERSION, "host": HOSTNAME}
    return 404, {"message": "not found", "version": VERSION}


def plugin_daemon_routes(path: str) -> tuple[int, dict]:
    if path == "/health/check":
        problems = check_dependencies(os.environ["DB_DATABASE"])
        if problems:
            return 503, {"code": -1, "message": "; ".join(problems)}
        return 200, {"code": 0, "message": "success", "data": {"version": VERSION}}
    return 404, {"code": -1, "message": "not found"}


def plugin_daemon_guard(path: str, headers) -> tuple[int, dict] | None:
    """What the real daemon checks of the api's calls: every /plugin/ route wants the header
    X-Api-Key equal to its SERVER_KEY (401 otherwise). With the key, a tenant's plugin list is
    empty (the api's console shows "no plugins"); other routes are left to the role's routes."""
    if ROLE != "plugin_daemon" or not path.startswith("/plugin/"):
        return None
    if headers.get("X-Api-Key") != os.environ.get("SERVER_KEY"):
        log(f"refused {path}: X-Api-Key is not SERVER_KEY")
        return 401, {"code": -401, "message": "unauthorized: X-Api-Key", "data": None}
    if path.endswith("/management/list"):
        return 200, {"code": 0, "message": "success", "data": {"list": [], "total": 0}}
    return None


def plugin_daemon_posts(path: str, headers, payload: dict) -> tuple[int, dict]:
    """POST /standin/inner/<route>: the daemon's call back to the api's inner API."""
    if not path.startswith("/standin/inner/"):
        return 404, {"code": -1, "message": "not found"}
    url = os.environ["DIFY_INNER_API_URL"].rstrip("/") + "/inner/api/" + \
        path.removeprefix("/standin/inner/")
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json",
                                              "X-Inner-Api-Key": os.environ["DIFY_INNER_API_KEY"]})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            status, text = answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.read().decode()
    except OSError as exc:
        return 502, {"code": -1, "message": f"{url}: {exc}"}
    try:
        body = json.loads(text)
    except ValueError:
        body = text
    return 200, {"status": status, "body": body}


def sandbox_routes(path: str) -> tuple[int, dict]:
    return (200, {"status": "ok"}) if path == "/health" else (404, {"message": "not found"})


def sandbox_posts(path: str, headers, payload: dict) -> tuple[int, dict]:
    """POST /v1/sandbox/run, as the real sandbox: its API key, then the code's stdout."""
    if path != "/v1/sandbox/run":
        return 404, {"message": "not found"}
    if headers.get("X-Api-Key") != os.environ.get("API_KEY"):
        log("refused /v1/sandbox/run: X-Api-Key is not API_KEY")
        return 401, {"code": -401, "message": "unauthorized: X-Api-Key", "data": None}
    if payload.get("language") != "python3":
        return 200, {"code": -400, "message": f"unsupported language {payload.get('language')}"}
    script = f"{payload.get('preload') or ''}\n{payload['code']}"
    try:
        run = subprocess.run(["python3", "-c", script], capture_output=True, text=True,
                             timeout=15, check=False)
    except subprocess.TimeoutExpired:
        return 200, {"code": 0, "message": "success",
                     "data": {"stdout": "", "error": "error: timeout"}}
    return 200, {"code": 0, "message": "success",
                 "data": {"stdout": run.stdout, "error": run.stderr if run.returncode else ""}}


def web_routes(path: str) -> tuple[int, dict]:
    return 200, {"page": path, "console_api": os.environ["CONSOLE_API_URL"], "version": VERSION}


def agent_redis() -> Redis:
    """The Redis of DIFY_AGENT_REDIS_URL (redis://[user]:password@host:port/db)."""
    url = urlparse(os.environ["DIFY_AGENT_REDIS_URL"])
    db = int(url.path.lstrip("/") or 0)
    return Redis(url.hostname or "", url.port or 6379, unquote(url.password or ""), db,
                 username=unquote(url.username or ""))


def agent_backend_routes(path: str) -> tuple[int, dict]:
    if path == "/openapi.json":
        problems = []
        try:
            client = agent_redis()
            try:
                client.call("PING")
            finally:
                client.close()
        except (OSError, RedisError, ValueError) as exc:
            problems.append(f"redis: {exc}")
        shellctl = os.environ["DIFY_AGENT_SHELLCTL_ENTRYPOINT"].rstrip("/") + "/healthz"
        try:
            with urllib.request.urlopen(shellctl, timeout=3) as answer:
                answer.read()
        except OSError as exc:
            problems.append(f"shellctl {shellctl}: {exc}")
        if problems:
            return 503, {"detail": "; ".join(problems)}
        return 200, {"openapi": "3.1.0", "info": {"title": "Dify Agent Run Server",
                                                  "version": VERSION}}
    return 404, {"detail": "Not Found"}


def local_sandbox_routes(path: str) -> tuple[int, dict]:
    return (200, {"status": "ok"}) if path == "/healthz" else (404, {"detail": "not found"})


def server_secret_ok() -> bool:
    """DIFY_AGENT_SERVER_SECRET_KEY: unpadded base64url decoding to exactly 32 bytes."""
    text = os.environ.get("DIFY_AGENT_SERVER_SECRET_KEY", "").strip()
    if not text or "=" in text:
        return False
    try:
        return len(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))) == 32
    except ValueError:
        return False


def serve(port: int, routes, posts=None) -> None:
    """Serve GET ``routes(path)`` and, when given, POST ``posts(path, headers, json body)``."""
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def answer(self, status: int, body: dict) -> None:
            data = (json.dumps(body) + "\n").encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            path = urlparse(self.path).path
            self.answer(*(plugin_daemon_guard(path, self.headers) or routes(path)))

        def do_POST(self) -> None:
            path = urlparse(self.path).path
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                payload = json.loads(raw or b"{}")
            except ValueError:
                self.answer(400, {"message": "the body is not JSON"})
                return
            self.answer(*(plugin_daemon_guard(path, self.headers)
                          or (posts(path, self.headers, payload) if posts
                              else (404, {"message": "not found"}))))

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    server.daemon_threads = True
    log(f"listening on :{port}")
    server.serve_forever(poll_interval=0.2)


def ssrf_proxy() -> None:
    conf = "/etc/squid/squid.conf"
    if not os.path.isfile(conf):
        log(f"{conf} is missing")
        sys.exit(1)
    listener = socket.create_server(("0.0.0.0", 3128))
    log("proxy on :3128 (refuses every request)")
    while True:
        client, _ = listener.accept()
        threading.Thread(target=refuse, args=(client,), daemon=True).start()


def refuse(client: socket.socket) -> None:
    with client:
        client.settimeout(5)
        try:
            client.recv(4096)
            client.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
        except OSError:
            pass


# --- Celery-like loops ---------------------------------------------------------------------


def broker_loop(key: str, value: dict, queues: list[str] | None = None) -> None:
    """Stay connected to the broker, announce ourselves, wait on the queues like a consumer."""
    while True:
        try:
            broker = broker_from_env()
            log(f"connected to the broker; queues: {','.join(queues or [])}")
            while True:
                broker.call("SET", key, json.dumps(value), "EX", 15)
                if queues:
                    broker.sock.settimeout(10)
                    broker.call("BRPOP", *queues, 3)
                else:
                    time.sleep(3)
        except (OSError, RedisError) as exc:
            log(f"broker: {exc}; retrying")
            time.sleep(2)


def storage_writable() -> None:
    """Like Dify with local storage: writing under storage/ must work (uid 1001 owns it)."""
    if os.environ.get("STORAGE_TYPE") == "opendal" and os.environ.get("OPENDAL_SCHEME") == "fs":
        root = os.environ.get("OPENDAL_FS_ROOT", "storage")
        path = os.path.join(root, f".standin-{HOSTNAME}")
        try:
            with open(path, "w") as handle:
                handle.write(VERSION)
        except OSError as exc:
            log(f"storage: {exc}")
            sys.exit(1)


def remote_installing_unset() -> bool:
    """The real daemon's rule: remote installing is on unless PLUGIN_REMOTE_INSTALLING_ENABLED
    says false, and then needs its host and port."""
    enabled = os.environ.get("PLUGIN_REMOTE_INSTALLING_ENABLED", "true").lower() != "false"
    return enabled and not (os.environ.get("PLUGIN_REMOTE_INSTALLING_HOST")
                            and os.environ.get("PLUGIN_REMOTE_INSTALLING_PORT"))


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if argv[:1] == ["flask"]:
        return flask(argv[1:])
    missing = [name for name in REQUIRED.get(ROLE, []) if not os.environ.get(name)]
    if missing:
        log(f"missing environment: {', '.join(missing)}")
        return 1
    if ROLE == "plugin_daemon" and remote_installing_unset():
        log("plugin remote installing host is empty")  # the real daemon's Validate()
        return 1
    if ROLE == "plugin_daemon":
        problem = migrate_plugin_database()
        if problem:
            log(f"failed to init dify plugin db: {problem}")
            return 1
    if ROLE == "api":
        mode = os.environ.get("MODE", "api")
        if os.environ.get("MIGRATION_ENABLED") == "true":
            print("Running migrations", flush=True)
            status = upgrade_db()
            if status:
                return status
            if mode == "migration" and os.environ.get("STANDIN_MIGRATION_MODE") == "1":
                print("Migration completed, exiting normally", flush=True)
                return 0
        if mode == "worker":
            queues = (os.environ.get("CELERY_WORKER_QUEUES") or os.environ.get("CELERY_QUEUES")
                      or DEFAULT_QUEUES).split(",")
            storage_writable()
            broker_loop(f"standin:worker:{HOSTNAME}", {"queues": queues, "version": VERSION},
                        queues)
        elif mode == "beat":
            broker_loop("standin:beat", {"host": HOSTNAME, "version": VERSION})
        else:
            storage_writable()
            serve(int(os.environ.get("DIFY_PORT", "5001")), api_routes)
    elif ROLE == "web":
        serve(3000, web_routes)
    elif ROLE == "plugin_daemon":
        serve(int(os.environ.get("SERVER_PORT", "5002")), plugin_daemon_routes,
              plugin_daemon_posts)
    elif ROLE == "sandbox":
        serve(int(os.environ.get("SANDBOX_PORT", "8194")), sandbox_routes, sandbox_posts)
    elif ROLE == "ssrf_proxy":
        ssrf_proxy()
    elif ROLE == "agent_backend":
        if not server_secret_ok():
            log("DIFY_AGENT_SERVER_SECRET_KEY must decode to exactly 32 bytes")
            return 1
        serve(5050, agent_backend_routes)
    elif ROLE == "local_sandbox":
        serve(5004, local_sandbox_routes)
    else:
        log(f"unknown role {ROLE!r}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
