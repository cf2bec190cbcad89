"""What a Dify user does over HTTP, for the tests that run the real Dify: set up the admin
account, log in to the console, import and publish a workflow app (an echo, or one with a
Python code node that the sandbox runs), make an app API key and run the app through the
service API with a streamed answer.

The console API of Dify 1.13+ keeps its tokens in cookies and wants the CSRF cookie echoed in
``X-CSRF-Token`` on every write; its login takes the password base64-encoded (as Dify's own
front end sends it). Everything goes to one base URL (the nginx load balancer in the tests).
"""

from __future__ import annotations

import base64
import itertools
import json
from collections.abc import Iterator

import requests
import yaml

TIMEOUT = 30


class Console:
    """A logged-in (once :meth:`login` ran) session of Dify's console API."""

    def __init__(self, base: str) -> None:
        """A session against the console API under ``base`` (e.g. ``http://lb``)."""
        self.base = base.rstrip("/")
        self.session = requests.Session()

    def _headers(self) -> dict[str, str]:
        """The CSRF header Dify checks on writes (the cookie's value, once logged in)."""
        token = self.session.cookies.get("csrf_token")
        return {"X-CSRF-Token": token} if token else {}

    def call(self, method: str, path: str, body: dict | None = None) -> requests.Response:
        """One console API request (``path`` below /console/api)."""
        return self.session.request(method, f"{self.base}/console/api{path}", json=body,
                                    headers=self._headers(), timeout=TIMEOUT)

    def setup(self, email: str, name: str, password: str) -> requests.Response:
        """POST /setup: the installation's first (admin) account and its workspace."""
        return self.call("POST", "/setup", {"email": email, "name": name, "password": password})

    def login(self, email: str, password: str) -> requests.Response:
        """POST /login with the password encoded as Dify's front end sends it."""
        encoded = base64.b64encode(password.encode()).decode()
        return self.call("POST", "/login", {"email": email, "password": encoded,
                                            "remember_me": True})

    def import_app(self, dsl: str) -> requests.Response:
        """POST /apps/imports of a DSL document (YAML text)."""
        return self.call("POST", "/apps/imports", {"mode": "yaml-content", "yaml_content": dsl})

    def publish(self, app_id: str) -> requests.Response:
        """POST /apps/<id>/workflows/publish: the draft becomes the published workflow."""
        return self.call("POST", f"/apps/{app_id}/workflows/publish", {})

    def api_key(self, app_id: str) -> requests.Response:
        """POST /apps/<id>/api-keys: a new service API key of the app."""
        return self.call("POST", f"/apps/{app_id}/api-keys")


def _workflow_dsl(dsl_version: str, name: str, nodes: list[dict]) -> str:
    """A workflow app's DSL: a start node with one text input ("words"), then ``nodes`` (each
    a node's data with its id) in a chain, the last one an end node."""
    graph_nodes = [{"id": "start", "type": "custom", "position": {"x": 0, "y": 0},
                    "data": {"type": "start", "title": "Start", "variables": [
                        {"variable": "words", "label": "words", "type": "text-input",
                         "required": True, "max_length": 200}]}}]
    graph_nodes += [{"id": node["id"], "type": "custom", "position": {"x": 300 * i, "y": 0},
                     "data": {k: v for k, v in node.items() if k != "id"}}
                    for i, node in enumerate(nodes, start=1)]
    edges = [{"id": f"{a['id']}-source-{b['id']}-target", "type": "custom",
              "source": a["id"], "sourceHandle": "source", "target": b["id"],
              "targetHandle": "target",
              "data": {"sourceType": a["data"]["type"], "targetType": b["data"]["type"],
                       "isInIteration": False}}
             for a, b in itertools.pairwise(graph_nodes)]
    document = {
        "kind": "app",
        "version": dsl_version,
        "app": {"mode": "workflow", "name": name, "description": "", "icon": "🤖",
                "icon_background": "#FFEAD5", "use_icon_as_answer_icon": False},
        "workflow": {"conversation_variables": [], "environment_variables": [], "features": {},
                     "graph": {"nodes": graph_nodes, "edges": edges}},
    }
    return yaml.safe_dump(document, sort_keys=False, allow_unicode=True)


def _end(selector: list[str]) -> dict:
    """The end node: one output, "echoed", taken from ``selector``."""
    return {"id": "end", "type": "end", "title": "End",
            "outputs": [{"variable": "echoed", "value_selector": selector}]}


def echo_workflow(dsl_version: str, name: str) -> str:
    """A workflow whose end node outputs its input: {"echoed": words}."""
    return _workflow_dsl(dsl_version, name, [_end(["start", "words"])])


CODE = "def main(words: str) -> dict:\n    return {'result': words.upper()}\n"


def code_workflow(dsl_version: str, name: str) -> str:
    """A workflow with a Python code node (run by the sandbox): {"echoed": words.upper()}."""
    code = {"id": "code", "type": "code", "title": "Upper", "code_language": "python3",
            "code": CODE, "outputs": {"result": {"type": "string", "children": None}},
            "variables": [{"variable": "words", "value_selector": ["start", "words"]}]}
    return _workflow_dsl(dsl_version, name, [code, _end(["code", "result"])])


def run_streaming(base: str, key: str, inputs: dict, timeout: float = 120) -> Iterator[dict]:
    """POST /v1/workflows/run with response_mode=streaming; yield each Server-Sent Event's
    data as it arrives (the caller stops when it has seen what it waits for)."""
    response = requests.post(f"{base.rstrip('/')}/v1/workflows/run",
                             headers={"Authorization": f"Bearer {key}"},
                             json={"inputs": inputs, "response_mode": "streaming",
                                   "user": "difyops-test"},
                             stream=True, timeout=(10, timeout))
    if response.status_code != 200:
        raise AssertionError(f"/v1/workflows/run: {response.status_code} {response.text[:500]}")
    with response:
        for line in response.iter_lines(decode_unicode=True):
            if line and line.startswith("data:"):
                yield json.loads(line[len("data:"):].strip())
