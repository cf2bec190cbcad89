"""The logging tier: the secured store's compose project, the shippers' rsyslog, rules, status."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tasks.core.errors import InputError
from tasks.core.inventory import Inventory
from tasks.core.plan import RunCommand, WaitFor, WriteFile
from tasks.core.render import write_tree
from tasks.core.validators import compose as compose_validator
from tasks.tiers import TIERS
from tasks.tiers import images as images_tier
from tasks.tiers import logging as tier
from tests.unit.conftest import good_secrets

STORE_ADDRESS = "10.0.4.11"


def with_store(base: dict[str, Any], **logging: Any) -> dict[str, Any]:
    """The base inventory plus a logging host (a copy: base stays as it was)."""
    data = copy.deepcopy(base)
    data["hosts"].append({"name": "logs1", "address": STORE_ADDRESS, "roles": ["logging"]})
    if logging:
        data["logging"] = logging
    return data


def plan_of(inventory: Inventory) -> dict[str, list]:
    return {plan.host.name: plan.steps for plan in tier.TIER.plan(inventory).hosts}


def files_of(steps: list) -> dict[str, WriteFile]:
    return {step.path: step for step in steps if isinstance(step, WriteFile)}


def labels(steps: list) -> list[str]:
    return [step.label for step in steps]


def compose_of(inventory: Inventory) -> dict:
    return yaml.safe_load(files_of(plan_of(inventory)["logs1"])[
        f"{tier.DIRECTORY}/compose.yml"].content)


def rsyslog_of(inventory: Inventory, host: str) -> WriteFile:
    return files_of(plan_of(inventory)[host])[tier.RSYSLOG_STAGED]


def problems(load, data: dict, secrets: dict[str, str] | None = None) -> str:
    with pytest.raises(InputError) as caught:
        load(data, secrets)
    return str(caught.value)


# --- the store ------------------------------------------------------------------------------

def test_no_logging_host_no_plan(load, base) -> None:
    assert tier.TIER.plan(load(base)).hosts == []


def test_the_tier_runs_after_monitor_in_deploy_all() -> None:
    names = [t.name for t in TIERS]
    assert names.index("logging") == names.index("monitor") + 1


def test_store_compose_has_security_on_and_ports_on_the_private_address(load, base) -> None:
    compose = compose_of(load(with_store(base)))
    es, kibana = compose["services"]["elasticsearch"], compose["services"]["kibana"]
    assert es["environment"]["xpack.security.enabled"] == "true"
    assert es["environment"]["discovery.type"] == "single-node"
    assert es["ports"] == [f"{STORE_ADDRESS}:9200:9200"]
    assert kibana["ports"] == [f"{STORE_ADDRESS}:5601:5601"]
    for service in compose["services"].values():
        for port in service.get("ports", []):
            assert port.startswith(f"{STORE_ADDRESS}:"), port  # never 0.0.0.0 or all addresses
        assert service["logging"]["options"] == {"max-size": "50m", "max-file": "5"}
        assert service["healthcheck"]["test"][0] == "CMD-SHELL"
    assert "es-data:/usr/share/elasticsearch/data" in es["volumes"]
    assert es["environment"]["ES_JAVA_OPTS"] == "-Xms1g -Xmx1g"
    assert es["deploy"]["resources"]["limits"]["memory"] == "2g"
    assert kibana["deploy"]["resources"]["limits"]["memory"] == "1g"
    assert "elastic:%s" in es["healthcheck"]["test"][1]  # the health check authenticates
    assert kibana["depends_on"] == {"elasticsearch": {"condition": "service_healthy"}}


def test_elasticsearch_serves_https_that_kibana_shippers_and_the_helper_verify(load,
                                                                             base) -> None:
    """tls.internal: HTTPS with the host's certificate (key readable by the image's gid 0),
    Kibana dialling the name the certificate holds with full verification, the shippers and
    the helper verifying the CA; without it, plain http as before."""
    inventory = load(with_store(base))
    compose = compose_of(inventory)
    es, kibana = compose["services"]["elasticsearch"], compose["services"]["kibana"]
    assert {key: value for key, value in es["environment"].items()
            if key.startswith("xpack.security.http.ssl")} == {
        "xpack.security.http.ssl.enabled": "true",
        "xpack.security.http.ssl.key": "certs/server.key",
        "xpack.security.http.ssl.certificate": "certs/server.crt",
        "xpack.security.http.ssl.certificate_authorities": "certs/ca.crt"}
    assert "./certs:/usr/share/elasticsearch/config/certs:ro" in es["volumes"]
    assert es["networks"]["default"]["aliases"] == ["logs1"]
    assert "--cacert /usr/share/elasticsearch/config/certs/ca.crt https'://127.0.0.1:9200" in \
        es["healthcheck"]["test"][1]
    assert kibana["environment"]["ELASTICSEARCH_HOSTS"] == '["https://logs1:9200"]'
    assert kibana["environment"]["ELASTICSEARCH_SSL_VERIFICATIONMODE"] == "full"
    files = files_of(plan_of(inventory)["logs1"])
    key = files[f"{tier.CERTS}/server.key"]
    assert (key.mode, key.owner, key.group, key.secret) == (0o640, "root", "root", True)
    assert "--cacert /opt/dify-logging/certs/ca.crt -K" in files[tier.ES_TOOL].content
    assert "url=https://10.0.4.11:9200" in files[tier.ES_TOOL].content
    shipper = plan_of(inventory)["db1"]
    assert files_of(shipper)["/etc/difyops/tls/ca.crt"].content == \
        files[f"{tier.CERTS}/ca.crt"].content
    action = re.search(r'action\(type="omelasticsearch"(.*?)\)\n',
                       rsyslog_of(inventory, "db1").content, re.S).group(1)
    params = dict(re.findall(r'([\w.]+)="([^"]*)"', action))
    assert (params["usehttps"], params["tls.cacert"], params["allowunsignedcerts"],
            params["skipverifyhost"]) == ("on", "/etc/difyops/tls/ca.crt", "off", "off")
    login = next(s.gate.command for s in shipper if isinstance(s, WaitFor)
                 and "accepts the shippers' login" in s.gate.name)
    assert "--cacert /etc/difyops/tls/ca.crt" in login and "https://10.0.4.11:9200" in login

    plain = load({**with_store(base), "tls": {"internal": False}})
    es = compose_of(plain)["services"]["elasticsearch"]
    assert es["environment"]["xpack.security.http.ssl.enabled"] == "false"
    assert 'usehttps="off"' in rsyslog_of(plain, "db1").content
    assert f"{tier.CERTS}/server.key" not in files_of(plan_of(plain)["logs1"])


def test_passwords_reach_the_store_only_through_the_env_file(load, base) -> None:
    inventory = load(with_store(base))
    files = files_of(plan_of(inventory)["logs1"])
    compose_text = files[f"{tier.DIRECTORY}/compose.yml"].content
    compose = yaml.safe_load(compose_text)
    es, kibana = compose["services"]["elasticsearch"], compose["services"]["kibana"]
    assert es["environment"]["ELASTIC_PASSWORD"] == "${ELASTIC_PASSWORD:?}"
    assert kibana["environment"]["ELASTICSEARCH_USERNAME"] == "kibana_system"  # never elastic
    assert kibana["environment"]["ELASTICSEARCH_PASSWORD"] == "${KIBANA_SYSTEM_PASSWORD:?}"
    assert kibana["environment"]["XPACK_SECURITY_ENCRYPTIONKEY"] == "${KIBANA_ENCRYPTION_KEY:?}"
    for value in good_secrets().values():
        assert value not in compose_text
    assert not re.search(r"changeme|xpack.security.enabled: \"?false", compose_text)
    env = files[f"{tier.DIRECTORY}/.env"]
    assert (env.mode, env.secret) == (0o600, True)
    assert env.content.splitlines() == [
        f"{name}={good_secrets()[name]}" for name in
        ("ELASTIC_PASSWORD", "LOGS_WRITER_PASSWORD", "KIBANA_SYSTEM_PASSWORD",
         "KIBANA_ENCRYPTION_KEY")]
    assert files[tier.ES_TOOL].mode == 0o700
    assert all(value not in files[tier.ES_TOOL].content for value in good_secrets().values())


def test_images_follow_the_mirror_and_the_private_registry(load, base) -> None:
    base["dify"] = {"registry_mirror": "mirror.example.com/"}
    data = with_store(base)
    compose = compose_of(load(data))
    assert compose["services"]["elasticsearch"]["image"] == \
        "mirror.example.com/elasticsearch:8.15.3"
    assert compose["services"]["kibana"]["image"] == "mirror.example.com/kibana:8.15.3"
    data["dify"]["private_registry"] = "registry.internal:5000"
    inventory = load(data)
    assert compose_of(inventory)["services"]["elasticsearch"]["image"] == \
        "registry.internal:5000/elasticsearch:8.15.3"
    # images.sync pulls them through the mirror and gets them onto the logging host.
    assert images_tier.upstream(inventory)["registry.internal:5000/kibana:8.15.3"] == \
        "mirror.example.com/kibana:8.15.3"
    assert images_tier.host_images(inventory, inventory.host("logs1")) == [
        "registry.internal:5000/elasticsearch:8.15.3", "registry.internal:5000/kibana:8.15.3"]


def test_store_steps_in_order_with_gates(load, base) -> None:
    steps = plan_of(load(with_store(base)))["logs1"]
    order = labels(steps)
    es_up, health = order.index("compose up elasticsearch"), next(
        i for i, label in enumerate(order) if label.startswith("health elasticsearch _cluster"))
    setup = order.index("set users and roles (log writer, kibana_system), index template, "
                        "retention")
    kibana_up = order.index("compose up kibana")
    assert es_up < health < setup < kibana_up
    gate = steps[health].gate
    assert gate.command == f"{tier.ES_TOOL} health" and gate.timeout == 300
    setup_step = steps[setup]
    assert (setup_step.command, setup_step.unless) == (f"{tier.ES_TOOL} setup",
                                                       f"{tier.ES_TOOL} check")
    assert "302" in steps[kibana_up + 1].gate.command
    assert isinstance(steps[es_up], RunCommand) and steps[es_up].on_change == (
        f"{tier.DIRECTORY}/.env", f"{tier.DIRECTORY}/compose.yml")


def test_max_map_count_is_raised_unless_mmap_is_off(load, base) -> None:
    inventory = load(with_store(base))
    steps = plan_of(inventory)["logs1"]
    assert files_of(steps)[tier.SYSCTL].content.endswith("vm.max_map_count = 262144\n")
    raise_step = next(s for s in steps if isinstance(s, RunCommand)
                      and s.name.startswith("raise vm.max_map_count"))
    assert raise_step.unless == 'test "$(cat /proc/sys/vm/max_map_count)" -ge 262144'
    assert "logging.allow_mmap: false" in raise_step.command  # the way out it names
    assert "node.store.allow_mmap" not in compose_of(inventory)["services"][
        "elasticsearch"]["environment"]
    off = load(with_store(base, allow_mmap=False))
    assert tier.SYSCTL not in files_of(plan_of(off)["logs1"])
    assert compose_of(off)["services"]["elasticsearch"]["environment"][
        "node.store.allow_mmap"] == "false"


def test_kibana_off_needs_no_kibana_secrets(load, base) -> None:
    secrets = {k: v for k, v in good_secrets().items() if not k.startswith("KIBANA_")}
    inventory = load(with_store(base, kibana=False), secrets)
    assert set(compose_of(inventory)["services"]) == {"elasticsearch"}
    assert "compose up kibana" not in labels(plan_of(inventory)["logs1"])
    assert "kibana_system" not in files_of(plan_of(inventory)["logs1"])[tier.ES_TOOL].content


def test_writer_role_may_only_add_documents(load, base) -> None:
    bodies = tier.security_bodies(load(with_store(base, retention_days=30)))
    assert bodies["role_body"] == {"cluster": [], "indices": [
        {"names": ["dify-logs-*"], "privileges": ["create_doc", "create_index"]}]}
    assert bodies["policy_body"]["policy"]["phases"]["delete"]["min_age"] == "30d"
    template = bodies["template_body"]
    assert template["index_patterns"] == ["dify-logs-*"]
    assert template["template"]["settings"]["number_of_replicas"] == 0
    assert template["template"]["settings"]["index.lifecycle.name"] == "dify-logs"
    other = tier.security_bodies(load(with_store(base, index_prefix="app-logs")))
    assert other["template_version"] != bodies["template_version"]  # a change is re-applied


def test_rendered_compose_passes_docker_compose_config(load, base, tmp_path: Path) -> None:
    if not shutil.which("docker") or subprocess.run(
            ["docker", "compose", "version"], capture_output=True, check=False).returncode:
        pytest.skip("docker compose v2 is not installed here (config.check reports it skipped)")
    inventory = load(with_store(base))
    write_tree([tier.TIER.plan(inventory)], tmp_path)
    verdicts = compose_validator(tmp_path)
    assert [(v.target, v.status) for v in verdicts] == [
        ("logs1:/opt/dify-logging/compose.yml", "passed")], verdicts


# --- the shippers ---------------------------------------------------------------------------

def test_every_host_ships_and_only_docker_hosts_read_container_logs(load, base) -> None:
    base["hosts"].append({"name": "win1", "address": "10.0.5.10", "roles": ["dev_frontend"],
                          "labels": {"os": "windows"}})
    inventory = load(with_store(base, kibana=False),
                     {k: v for k, v in good_secrets().items() if not k.startswith("KIBANA_")})
    plans = plan_of(inventory)
    assert "win1" not in plans
    assert all(tier.RSYSLOG_STAGED in files_of(steps) for steps in plans.values())
    api = rsyslog_of(inventory, "api1").content
    db = rsyslog_of(inventory, "db1").content
    assert 'File="/var/lib/docker/containers/*/*-json.log"' in api
    assert "imfile" not in db and "mmjsonparse" not in db
    assert 'module(load="imjournal"' in db and 'module(load="imjournal"' in api


def test_rsyslog_configuration_facts(load, base) -> None:
    inventory = load(with_store(base))
    step = rsyslog_of(inventory, "db1")
    assert (step.mode, step.secret) == (0o600, True)  # it holds the writer's password
    text = step.content
    action = re.search(r'action\(type="omelasticsearch"(.*?)\)\n', text, re.S).group(1)
    params = dict(re.findall(r'([\w.]+)="([^"]*)"', action))
    assert params["server"] == STORE_ADDRESS and params["serverport"] == "9200"
    assert params["uid"] == "difyops_logs_writer"
    assert params["pwd"] == good_secrets()["LOGS_WRITER_PASSWORD"]
    assert params["esVersion.major"] == "8"  # no mapping type in bulk requests
    assert (params["writeoperation"], params["dynbulkid"]) == ("create", "on")
    assert params["dynSearchIndex"] == "on" and params["searchIndex"] == "difyops-es-index"
    assert params["queue.type"] == "LinkedList" and params["queue.filename"] == "difyops-es"
    assert (params["queue.saveOnShutdown"], params["queue.maxDiskSpace"]) == ("on", "1g")
    assert params["action.resumeRetryCount"] == "-1"
    assert 'constant(value="dify-logs-")' in text  # daily index names
    assert text.count("position.from") == 3


def test_shipper_checks_with_rsyslogd_before_installing(load, base) -> None:
    steps = plan_of(load(with_store(base)))["db1"]
    order = labels(steps)
    login = order.index("health the store logs1 accepts the shippers' login")
    check = order.index("check the rsyslog configuration (rsyslogd -N1) and install it")
    restart = order.index("restart rsyslog (new configuration)")
    assert login < check < restart
    check_step = steps[check]
    assert check_step.unless == f"cmp -s {tier.RSYSLOG_STAGED} {tier.RSYSLOG_LIVE}"
    command = check_step.command
    assert command.index("rsyslogd -N1") < command.index(
        f"install -m 0600 {tier.RSYSLOG_STAGED} {tier.RSYSLOG_LIVE}")
    # A refusal exits before the live file is replaced.
    assert command.endswith(f"exit 1; fi; install -m 0600 {tier.RSYSLOG_STAGED} "
                            f"{tier.RSYSLOG_LIVE}")
    gate = steps[login].gate
    assert isinstance(steps[login], WaitFor) and "/_security/_authenticate" in gate.command
    assert good_secrets()["LOGS_WRITER_PASSWORD"] not in gate.command  # read from the file
    assert tier.RSYSLOG_LIVE in steps[restart].command


# --- rules ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("settings", "key", "words"), [
    ({"security": False}, "logging.security", "answers anyone"),
    ({"heap": "2g", "es_memory": "3g"}, "logging.heap", "at most half of logging.es_memory"),
    ({"heap": "32g", "es_memory": "64g"}, "logging.heap", "above 31g"),
    ({"heap": "lots"}, "logging.heap", "'lots' is not a size"),
    ({"queue_max_disk": "1t"}, "logging.queue_max_disk", "'1t' is not a size"),
    ({"index_prefix": "Dify Logs"}, "logging.index_prefix", "not usable in an Elasticsearch"),
    ({"writer_user": "elastic"}, "logging.writer_user", "Elasticsearch reserves it"),
    ({"kibana_image": "kibana:8.14.0"}, "logging.kibana_image", "Kibana refuses to start"),
    ({"elasticsearch_image": "elasticsearch"}, "logging.elasticsearch_image", "no version tag"),
    ({"kibana_port": 9200}, "logging.kibana_port", "the same port as logging.es_port"),
    ({"retention_days": 0}, "logging.retention_days", "0 is not a positive integer"),
])
def test_bad_logging_settings_are_refused(load, base, settings, key, words) -> None:
    message = problems(load, with_store(base, **settings))
    assert f": {key}: " in message and words in message, message
    assert "fix: " in message


def test_two_logging_hosts_are_refused(load, base) -> None:
    data = with_store(base)
    data["hosts"].append({"name": "logs2", "address": "10.0.4.12", "roles": ["logging"]})
    message = problems(load, data)
    assert "2 hosts have role 'logging' (logs1, logs2)" in message
    assert "single-node Elasticsearch" in message and "keep 'logging' on one host" in message


def test_a_logging_host_needs_an_ip_address(load, base) -> None:
    data = with_store(base)
    data["hosts"][-1]["address"] = "logs.internal"
    message = problems(load, data)
    assert "'logs.internal': the logging host publishes Elasticsearch" in message


def test_logging_secrets_are_needed_and_published_ones_refused(load, base) -> None:
    missing = {k: v for k, v in good_secrets().items() if k != "LOGS_WRITER_PASSWORD"}
    assert "LOGS_WRITER_PASSWORD: missing" in problems(load, with_store(base), missing)
    published = {**good_secrets(), "ELASTIC_PASSWORD": "changeme"}
    assert "ELASTIC_PASSWORD: is a published default" in problems(load, with_store(base),
                                                                  published)
    # Without a logging host, none of them is asked for.
    load(base, {k: v for k, v in good_secrets().items()
                if k not in ("ELASTIC_PASSWORD", "LOGS_WRITER_PASSWORD", "KIBANA_SYSTEM_PASSWORD",
                             "KIBANA_ENCRYPTION_KEY")})


# --- status ---------------------------------------------------------------------------------

def test_parse_stats_keeps_the_last_report_per_counter_set() -> None:
    text = "\n".join([
        'Mon Nov 30 17:45:18 2026: { "name": "difyops-es queue", "size": 7, "enqueued": 16 }',
        'Mon Nov 30 17:45:18 2026: { "name": "difyops-es", "processed": 9, "failed": 2 }',
        "garbage line",
        'Mon Nov 30 17:45:28 2026: { "name": "difyops-es queue", "size": 0, "enqueued": 18 }',
    ])
    stats = tier.parse_stats(text)
    assert stats["difyops-es queue"]["size"] == 0 and stats["difyops-es"]["failed"] == 2


def test_store_state_reads_health_indices_and_newest_document(load, base) -> None:
    inventory = load(with_store(base, kibana=False),
                     {k: v for k, v in good_secrets().items() if not k.startswith("KIBANA_")})
    answers = {
        "/_cluster/health": {"status": "green", "number_of_nodes": 1},
        "/_cat/indices/dify-logs-*?format=json&h=index,docs.count": [
            {"index": "dify-logs-2026.11.29", "docs.count": "5"},
            {"index": "dify-logs-2026.11.30", "docs.count": "7"}],
        "/dify-logs-*/_search?size=1&sort=@timestamp:desc&_source=@timestamp,host": {
            "hits": {"hits": [{"_source": {"@timestamp": "2026-11-30T17:44:18+00:00"}}]}},
    }

    class FakeMachine:
        host = inventory.host("logs1")

        def run(self, command: str, **_: Any):
            path = command.split(" get ", 1)[1].strip("'")
            return type("R", (), {"ok": True, "stdout": json.dumps(answers[path]),
                                  "answer": ""})()

    state = tier.store_state(inventory, FakeMachine())
    assert (state.status, state.nodes, state.indices, state.documents) == ("green", 1, 2, 12)
    assert state.last_document == "2026-11-30T17:44:18+00:00" and state.ok


def test_status_without_a_logging_host_says_what_to_do(write_inventory, base, monkeypatch) -> None:
    from invoke import Context
    from invoke.exceptions import Exit

    from tasks import logs

    monkeypatch.setenv("DIFY_INVENTORY", str(write_inventory(base)))
    with pytest.raises(Exit) as caught:
        logs.status(Context())
    assert "no host has the role 'logging'" in str(caught.value.message)
    assert "`inv logging.deploy`" in str(caught.value.message)
