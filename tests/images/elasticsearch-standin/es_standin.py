#!/usr/bin/env python3
"""A stand-in for Elasticsearch 8 and Kibana in difyops' integration tests (the real images
cannot be pulled where the tests run). It honours the contract the logging tier relies on:

Elasticsearch (STANDIN_ROLE=elasticsearch, :9200), security on:
- every endpoint needs HTTP basic auth: 401 without it or with a wrong password;
- `elastic` authenticates with ELASTIC_PASSWORD (the bootstrap password); reserved users such as
  kibana_system only once their password was set (POST _security/user/<name>/_password); PUT of a
  reserved user is refused as Elasticsearch does;
- users and roles (PUT/GET _security/user|role/<name>), _security/_authenticate,
  _security/user/_has_privileges; index privileges all, write, index, create, create_doc,
  create_index, read, manage with their implications; the superuser may do everything;
- _bulk (NDJSON, as omelasticsearch sends it): `_type` in an action line is refused as
  Elasticsearch 8 does; `create` needs create_doc (or more), an existing _id is a 409 item; a new
  index needs create_index, and gets the settings of the matching index template;
- _cluster/health, _cat/indices, _index_template, _ilm/policy, _count and _search (query
  match/match_phrase/term on a field, or q=field:text; sort=@timestamp:desc; size);
- everything is kept in the data folder (a volume): a restart loses nothing;
- xpack.security.http.ssl.enabled=true: HTTPS only, with the PEM key, certificate and CA the
  xpack.security.http.ssl.* settings name (relative to the config folder, as Elasticsearch
  resolves them); it refuses to start, as Elasticsearch does, when one is missing or the key is
  unreadable for the image's user (uid 1000, gid 0); renewed files are loaded within seconds.

Kibana (STANDIN_ROLE=kibana, :5601): logs in to ELASTICSEARCH_HOSTS as ELASTICSEARCH_USERNAME
(refuses to start as `elastic`, like Kibana 8), over https verifying the server with
ELASTICSEARCH_SSL_CERTIFICATEAUTHORITIES (ELASTICSEARCH_SSL_VERIFICATIONMODE full, the default,
also checks the name); GET / answers 302 once that login works, 503 "Kibana server is not ready
yet" before.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import os
import ssl
import stat
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

ROLE = os.environ.get("STANDIN_ROLE", "elasticsearch")
VERSION = os.environ.get("STANDIN_VERSION", "8.15.3")
DATA = os.environ.get("STANDIN_DATA", "/usr/share/elasticsearch/data")
CONFIG = "/usr/share/elasticsearch/config"
IMAGE_UID, IMAGE_GID = 1000, 0  # the user Elasticsearch's image runs as
RESERVED = ("elastic", "kibana_system", "kibana", "logstash_system", "beats_system",
            "apm_system", "remote_monitoring_user")
IMPLIED = {
    "all": {"all", "write", "index", "create", "create_doc", "delete", "create_index", "read",
            "manage", "monitor", "view_index_metadata"},
    "write": {"write", "index", "create", "create_doc", "delete"},
    "index": {"index", "create", "create_doc"},
    "create": {"create", "create_doc"},
    "manage": {"manage", "create_index", "monitor", "view_index_metadata"},
    "read": {"read"},
}
LOCK = threading.Lock()


def log(message: str) -> None:
    print(f"[standin {ROLE} {VERSION}] {message}", flush=True)


def setting(name: str, default: str = "") -> str:
    """An Elasticsearch setting given as an environment variable (dotted, as compose sets it)."""
    return os.environ.get(name, default)


def digest(password: str) -> str:
    return hashlib.sha256(password.encode()).hexdigest()


class Store:
    """Users, roles, templates, policies and documents, persisted as one JSON file."""

    def __init__(self, folder: str) -> None:
        self.path = os.path.join(folder, "standin.json")
        os.makedirs(folder, exist_ok=True)
        self.state = {"users": {}, "roles": {}, "templates": {}, "policies": {}, "indices": {}}
        if os.path.exists(self.path):
            with open(self.path) as handle:
                self.state.update(json.load(handle))

    def save(self) -> None:
        temporary = self.path + ".tmp"
        with open(temporary, "w") as handle:
            json.dump(self.state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self.path)

    def authenticate(self, user: str, password: str) -> list[str] | None:
        """The user's roles, or None when the password is wrong or the user unknown."""
        stored = self.state["users"].get(user)
        if user == "elastic" and stored is None:
            bootstrap = os.environ.get("ELASTIC_PASSWORD", "")
            return ["superuser"] if bootstrap and password == bootstrap else None
        if stored is None or stored.get("hash") != digest(password):
            return None
        return list(stored.get("roles", []))

    def index_privileges(self, roles: list[str]) -> list[tuple[list[str], set[str]]]:
        grants = []
        for role in roles:
            if role == "superuser":
                grants.append((["*"], set(IMPLIED["all"])))
            for entry in self.state["roles"].get(role, {}).get("indices", []):
                privileges: set[str] = set()
                for name in entry.get("privileges", []):
                    privileges |= IMPLIED.get(name, {name})
                grants.append((list(entry.get("names", [])), privileges))
        return grants

    def may(self, roles: list[str], index: str, privilege: str) -> bool:
        return any(privilege in privileges and any(fnmatch.fnmatchcase(index, p) for p in names)
                   for names, privileges in self.index_privileges(roles))

    def indices(self, pattern: str) -> list[str]:
        patterns = [p for p in pattern.split(",") if p] or ["*"]
        return sorted(name for name in self.state["indices"]
                      if any(fnmatch.fnmatchcase(name, p) for p in patterns))

    def create_index(self, name: str) -> None:
        settings: dict = {}
        for template in sorted(self.state["templates"].values(),
                               key=lambda t: t.get("priority", 0)):
            if any(fnmatch.fnmatchcase(name, p) for p in template.get("index_patterns", [])):
                settings = template.get("template", {}).get("settings", {})
        self.state["indices"][name] = {"settings": settings, "docs": {}}


STORE: Store | None = None


def matches(doc: dict, query: dict) -> bool:
    """match, match_phrase (text contains), term (equal); match_all."""
    if not query or "match_all" in query:
        return True
    for kind in ("match", "match_phrase", "term"):
        if kind in query:
            (field, wanted), = query[kind].items()
            if isinstance(wanted, dict):
                wanted = wanted.get("query", wanted.get("value", ""))
            value = doc.get(field)
            if kind == "term":
                return value == wanted
            return isinstance(value, str) and str(wanted).lower() in value.lower()
    if "bool" in query:
        return all(matches(doc, q) for q in query["bool"].get("must", []))
    return False


class ElasticHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args: object) -> None:
        pass

    def answer(self, status: int, body: object, headers: dict | None = None) -> None:
        data = json.dumps(body, separators=(",", ":")).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-elastic-product", "Elasticsearch")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)
        # Only refusals and changes: this log is shipped back into the store (no feedback loop).
        path = urlparse(self.path).path
        if status >= 400 or (self.command in ("PUT", "POST") and "/_bulk" not in path
                             and "_has_privileges" not in path):
            log(f"{self.command} {path} {status}")

    def error(self, status: int, kind: str, reason: str, headers: dict | None = None) -> None:
        self.answer(status, {"error": {"type": kind, "reason": reason,
                                       "root_cause": [{"type": kind, "reason": reason}]},
                             "status": status}, headers)

    def forbidden(self, user: str, action: str) -> None:
        self.error(403, "security_exception",
                   f"action [{action}] is unauthorized for user [{user}]")

    def body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def user(self) -> tuple[str, list[str]] | None:
        header = self.headers.get("Authorization", "")
        if header.startswith("Basic "):
            try:
                user, _, password = base64.b64decode(header[6:]).decode().partition(":")
            except ValueError:
                user, password = "", ""
            roles = STORE.authenticate(user, password)
            if roles is not None:
                return user, roles
            reason = f"unable to authenticate user [{user}] for REST request [{self.path}]"
        else:
            reason = f"missing authentication credentials for REST request [{self.path}]"
        self.body()
        self.error(401, "security_exception", reason,
                   {"WWW-Authenticate": 'Basic realm="security", charset="UTF-8"'})
        return None

    def do_GET(self) -> None:
        self.route()

    def do_POST(self) -> None:
        self.route()

    def do_PUT(self) -> None:
        self.route()

    def do_HEAD(self) -> None:
        self.route()

    def do_DELETE(self) -> None:
        self.route()

    def route(self) -> None:
        who = self.user()
        if who is None:
            return
        user, roles = who
        url = urlparse(self.path)
        parts = [unquote(p) for p in url.path.split("/") if p]
        params = {k: v[-1] for k, v in parse_qs(url.query).items()}
        raw = self.body()
        superuser = "superuser" in roles
        monitor = superuser or "kibana_system" in roles
        with LOCK:
            try:
                self.dispatch(user, roles, superuser, monitor, parts, params, raw)
            except (ValueError, KeyError, TypeError) as exc:
                self.error(400, "parse_exception", f"{type(exc).__name__}: {exc}")

    def dispatch(self, user: str, roles: list[str], superuser: bool, monitor: bool,
                 parts: list[str], params: dict, raw: bytes) -> None:
        method = self.command
        state = STORE.state
        if not parts:
            if not monitor:
                return self.forbidden(user, "cluster:monitor/main")
            return self.answer(200, {"name": setting("node.name", "standin"),
                                     "cluster_name": setting("cluster.name", "standin"),
                                     "version": {"number": VERSION},
                                     "tagline": "You Know, for Search"})
        head = parts[0]
        if head == "_cluster" and parts[1:] == ["health"]:
            if not monitor:
                return self.forbidden(user, "cluster:monitor/health")
            return self.answer(200, {"cluster_name": setting("cluster.name", "standin"),
                                     "status": "green", "timed_out": False,
                                     "number_of_nodes": 1, "number_of_data_nodes": 1,
                                     "active_shards": len(state["indices"])})
        if head == "_security":
            return self.security(user, roles, superuser, parts[1:], raw)
        if head == "_index_template" and len(parts) == 2:
            return self.named(superuser, user, "templates", parts[1], raw,
                              lambda name, body: {"index_templates": [
                                  {"name": name, "index_template": body}]})
        if head == "_ilm" and parts[1:2] == ["policy"] and len(parts) == 3:
            return self.named(superuser, user, "policies", parts[2], raw,
                              lambda name, body: {name: {"version": 1, "policy":
                                                         body.get("policy", {})}})
        if head == "_cat" and parts[1:2] == ["indices"]:
            if not monitor:
                return self.forbidden(user, "indices:monitor/stats")
            names = STORE.indices(parts[2] if len(parts) > 2 else "*")
            return self.answer(200, [{"index": n, "health": "green", "status": "open",
                                      "docs.count": str(len(state["indices"][n]["docs"]))}
                                     for n in names])
        if head == "_bulk" and method in ("POST", "PUT"):
            return self.bulk(user, roles, raw)
        if parts[-1] in ("_search", "_count") and method in ("GET", "POST"):
            pattern = parts[0] if len(parts) == 2 else "*"
            return self.search(user, roles, pattern, parts[-1], params, raw)
        return self.error(400, "illegal_argument_exception",
                          f"no handler for {method} {'/'.join(parts)} in this stand-in")

    def named(self, superuser: bool, user: str, kind: str, name: str, raw: bytes, show) -> None:
        if not superuser:
            return self.forbidden(user, f"cluster:admin/{kind}")
        if self.command == "PUT":
            STORE.state[kind][name] = json.loads(raw)
            STORE.save()
            return self.answer(200, {"acknowledged": True})
        if name not in STORE.state[kind]:
            return self.error(404, "resource_not_found_exception", f"{kind} [{name}] missing")
        return self.answer(200, show(name, STORE.state[kind][name]))

    def security(self, user: str, roles: list[str], superuser: bool, parts: list[str],
                 raw: bytes) -> None:
        state = STORE.state
        if parts == ["_authenticate"]:
            return self.answer(200, {"username": user, "roles": roles, "enabled": True})
        if parts[:2] == ["user", "_has_privileges"]:
            wanted = json.loads(raw or b"{}")
            answer: dict = {"username": user, "cluster": {}, "index": {}}
            for entry in wanted.get("index", []):
                for name in entry.get("names", []):
                    answer["index"][name] = {p: STORE.may(roles, name, p)
                                             for p in entry.get("privileges", [])}
            for privilege in wanted.get("cluster", []):
                answer["cluster"][privilege] = superuser
            answer["has_all_requested"] = all(
                all(v.values()) for v in answer["index"].values()) and all(
                answer["cluster"].values())
            return self.answer(200, answer)
        if not superuser:
            return self.forbidden(user, "cluster:admin/xpack/security")
        if parts[0] == "user" and len(parts) == 3 and parts[2] == "_password":
            name = parts[1]
            if name not in RESERVED and name not in state["users"]:
                return self.error(404, "resource_not_found_exception", f"user [{name}] missing")
            entry = state["users"].setdefault(name, {"roles": [name] if name != "elastic"
                                                     else ["superuser"]})
            entry["hash"] = digest(json.loads(raw)["password"])
            STORE.save()
            return self.answer(200, {})
        if parts[0] in ("user", "role") and len(parts) == 2:
            kind, name = ("users" if parts[0] == "user" else "roles"), parts[1]
            if self.command == "GET":
                if name not in state[kind]:
                    return self.answer(404, {})
                shown = {k: v for k, v in state[kind][name].items() if k != "hash"}
                return self.answer(200, {name: shown})
            body = json.loads(raw)
            if kind == "users":
                if name in RESERVED:
                    return self.error(400, "validation_exception",
                                      f"Validation Failed: 1: user [{name}] is reserved and "
                                      f"only the password can be changed;")
                created = name not in state["users"]
                entry = state["users"].setdefault(name, {})
                entry["roles"] = list(body.get("roles", []))
                if "password" in body:
                    entry["hash"] = digest(body["password"])
                STORE.save()
                return self.answer(200, {"created": created})
            created = name not in state["roles"]
            state["roles"][name] = body
            STORE.save()
            return self.answer(200, {"role": {"created": created}})
        return self.error(400, "illegal_argument_exception", "unknown security request")

    def bulk(self, user: str, roles: list[str], raw: bytes) -> None:
        lines = [line for line in raw.decode().split("\n") if line.strip()]
        items, errors, changed = [], False, False
        index = 0
        while index < len(lines):
            action_line = json.loads(lines[index])
            (action, meta), = action_line.items()
            if "_type" in meta:
                return self.error(400, "illegal_argument_exception",
                                  f"Action/metadata line [{index + 1}] contains an unknown "
                                  f"parameter [_type]")
            doc = json.loads(lines[index + 1])
            index += 2
            name, doc_id = meta["_index"], meta.get("_id") or os.urandom(10).hex()
            result = {"_index": name, "_id": doc_id}
            needed = "create_doc" if action == "create" else "index"
            if not STORE.may(roles, name, needed) or (
                    name not in STORE.state["indices"]
                    and not STORE.may(roles, name, "create_index")):
                result.update(status=403, error={
                    "type": "security_exception",
                    "reason": f"action [indices:data/write/bulk[s]] is unauthorized for user "
                              f"[{user}] on indices [{name}]"})
            else:
                if name not in STORE.state["indices"]:
                    STORE.create_index(name)
                docs = STORE.state["indices"][name]["docs"]
                if action == "create" and doc_id in docs:
                    result.update(status=409, error={
                        "type": "version_conflict_engine_exception",
                        "reason": f"[{doc_id}]: version conflict, document already exists"})
                else:
                    docs[doc_id] = doc
                    changed = True
                    result.update(status=201, result="created")
            errors = errors or result["status"] >= 300
            items.append({action: result})
        if changed:
            STORE.save()
        self.answer(200, {"took": 1, "errors": errors, "items": items})

    def search(self, user: str, roles: list[str], pattern: str, kind: str, params: dict,
               raw: bytes) -> None:
        names = STORE.indices(pattern)
        if any(not STORE.may(roles, name, "read") for name in names) or (
                not names and not STORE.may(roles, pattern, "read")):
            return self.forbidden(user, f"indices:data/read/{kind[1:]}")
        body = json.loads(raw) if raw.strip() else {}
        query = body.get("query", {})
        if "q" in params:
            field, _, text = params["q"].partition(":")
            query = {"match_phrase": {field: text}} if text else {"match_phrase":
                                                                   {"message": field}}
        hits = [{"_index": name, "_id": doc_id, "_source": doc}
                for name in names for doc_id, doc in STORE.state["indices"][name]["docs"].items()
                if matches(doc, query)]
        if kind == "_count":
            return self.answer(200, {"count": len(hits)})
        sort = params.get("sort", "")
        if sort:
            field, _, order = sort.partition(":")
            hits.sort(key=lambda h: str(h["_source"].get(field, "")), reverse=order == "desc")
        size = int(params.get("size", body.get("size", 10)))
        self.answer(200, {"took": 1, "timed_out": False,
                          "hits": {"total": {"value": len(hits), "relation": "eq"},
                                   "hits": hits[:size]}})


# --- Kibana ---------------------------------------------------------------------------------

READY = {"at": 0.0}


def kibana_ready() -> bool:
    if time.monotonic() - READY["at"] < 5:
        return True
    hosts = json.loads(os.environ.get("ELASTICSEARCH_HOSTS", '["http://elasticsearch:9200"]'))
    user = os.environ.get("ELASTICSEARCH_USERNAME", "")
    password = os.environ.get("ELASTICSEARCH_PASSWORD", "")
    request = urllib.request.Request(f"{hosts[0].rstrip('/')}/_security/_authenticate")
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    context = ssl.create_default_context(
        cafile=os.environ.get("ELASTICSEARCH_SSL_CERTIFICATEAUTHORITIES") or None)
    context.check_hostname = os.environ.get("ELASTICSEARCH_SSL_VERIFICATIONMODE",
                                            "full") == "full"
    try:
        with urllib.request.urlopen(request, timeout=5, context=context) as answer:
            ok = answer.status == 200
    except (urllib.error.URLError, OSError) as exc:
        log(f"cannot log in to Elasticsearch as {user}: {exc}")
        ok = False
    if ok:
        READY["at"] = time.monotonic()
    return ok


class KibanaHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if kibana_ready():
            self.send_response(302)
            self.send_header("Location", "/login?next=%2F")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = b"Kibana server is not ready yet"
        self.send_response(503)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def readable_by_the_image(path: str) -> bool:
    """Whether Elasticsearch's user (uid 1000, gid 0) may read a file."""
    info = os.stat(path)
    return bool(info.st_mode & stat.S_IROTH
                or (info.st_uid == IMAGE_UID and info.st_mode & stat.S_IRUSR)
                or (info.st_gid == IMAGE_GID and info.st_mode & stat.S_IRGRP))


def https(server: ThreadingHTTPServer) -> None:
    """Serve TLS only, from the files the xpack.security.http.ssl.* settings name; the files
    are read again when they change (Elasticsearch watches them)."""
    files = {name: os.path.join(CONFIG, setting(f"xpack.security.http.ssl.{name}"))
             for name in ("key", "certificate", "certificate_authorities")}
    for name, path in files.items():
        if not setting(f"xpack.security.http.ssl.{name}") or not os.path.isfile(path):
            log(f"xpack.security.http.ssl.{name}: no file at {path}")
            sys.exit(78)
        if not readable_by_the_image(path):
            log(f"xpack.security.http.ssl.{name}: {path} is not readable by uid {IMAGE_UID}")
            sys.exit(78)
    loaded = {"stamp": None, "context": None}

    def context() -> ssl.SSLContext:
        stamp = tuple(os.stat(path).st_mtime_ns for path in files.values())
        if stamp != loaded["stamp"]:
            made = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            made.minimum_version = ssl.TLSVersion.TLSv1_2
            made.load_cert_chain(files["certificate"], files["key"])
            loaded.update(stamp=stamp, context=made)
        return loaded["context"]

    context()
    plain = server.get_request

    def get_request():
        connection, address = plain()
        # The handshake happens in the request's thread: a client that never completes it
        # holds up no other.
        return context().wrap_socket(connection, server_side=True,
                                     do_handshake_on_connect=False), address

    server.get_request = get_request


def main() -> None:
    global STORE
    if ROLE == "kibana":
        if os.environ.get("ELASTICSEARCH_USERNAME") == "elastic":
            log('FATAL: value of "elastic" is forbidden for elasticsearch.username: a superuser '
                'account cannot write to the system indices Kibana needs')
            sys.exit(78)
        server = ThreadingHTTPServer(("0.0.0.0", 5601), KibanaHandler)
    else:
        if setting("xpack.security.enabled") != "true":
            log("this stand-in only runs with xpack.security.enabled=true")
            sys.exit(78)
        if not os.environ.get("ELASTIC_PASSWORD"):
            log("ELASTIC_PASSWORD is not set: the elastic user could never log in")
            sys.exit(78)
        STORE = Store(DATA)
        server = ThreadingHTTPServer(("0.0.0.0", 9200), ElasticHandler)
        if setting("xpack.security.http.ssl.enabled") == "true":
            https(server)
    log(f"listening on {server.server_address[1]}")
    server.serve_forever()


if __name__ == "__main__":
    main()
