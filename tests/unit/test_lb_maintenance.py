"""Maintenance mode without hosts (tasks/tiers/lb_maintenance.py and the site's part of it): the
rendered switch, the pages and their escaping, on and off against in-memory machines."""

from __future__ import annotations

import json
import re

import pytest

from tasks.core.errors import DifyopsError, HostError, InputError
from tasks.core.hosts import Result
from tasks.tiers import lb_maintenance
from tests.unit.fakes import FakeMachine
from tests.unit.test_lb import locations, main_server, rendered, server_level


def test_the_site_answers_503_from_the_page_while_it_exists_but_not_to_management(
        load, base) -> None:
    base["net"] = {"management": ["10.0.4.0/24", "192.0.2.7"]}
    base["lb"] = {"maintenance_retry_after": 120}
    site = rendered(load(base))
    geo = re.search(r"geo \$dify_management \{(.*?)\}", site, re.S).group(1)
    assert geo.split() == ["default", "0;", "10.0.4.0/24", "1;", "192.0.2.7/32", "1;"]
    server = server_level(main_server(site))
    assert [line.strip() for line in server.splitlines() if "dify_serve" in line] == [
        "set $dify_serve $dify_management;",
        "if (!-f /var/www/difyops-maintenance/maintenance.html) { set $dify_serve 1; }",
        "if ($uri = /health) { set $dify_serve 1; }",
        "if ($dify_serve = 0) { return 503; }"]
    assert "error_page 503 @dify_maintenance;" in server
    page = locations(main_server(site))["@dify_maintenance"]
    assert "add_header Retry-After 120 always;" in page
    assert "try_files /$dify_maintenance_page =503;" in page
    assert "root /var/www/difyops-maintenance;" in page
    assert "add_header X-Content-Type-Options nosniff always;" in page  # headers kept
    pages = re.search(r"map \$uri \$dify_maintenance_page \{(.*?)\}", site, re.S).group(1)
    assert pages.split() == ["~^/(console/api|api|v1)(/|$)", "maintenance.json;",
                             "default", "maintenance.html;"]


def test_without_management_addresses_everyone_gets_the_page(load, base) -> None:
    base["net"] = {"firewall": "off", "management": []}
    geo = re.search(r"geo \$dify_management \{(.*?)\}", rendered(load(base)), re.S).group(1)
    assert geo.split() == ["default", "0;"]


def test_the_message_is_escaped_for_each_page() -> None:
    message = '<b>back at 10:00</b> & "soon" \\o/'
    pages = lb_maintenance.pages(message)
    html_page = pages[lb_maintenance.HTML_PATH].decode()
    assert "<p>&lt;b&gt;back at 10:00&lt;/b&gt; &amp; &quot;soon&quot; \\o/</p>" in html_page
    assert json.loads(pages[lb_maintenance.JSON_PATH]) == {
        "code": "maintenance", "message": message, "status": 503}
    assert list(pages) == [lb_maintenance.JSON_PATH, lb_maintenance.HTML_PATH]  # switch last


@pytest.mark.parametrize(("state", "message", "error"), [
    ("maybe", "", "'maybe' is not on or off"),
    ("on", "two\nlines", "must be one line"),
    ("on", "x" * 501, "at most 500 characters")])
def test_bad_input_is_refused(state, message, error) -> None:
    with pytest.raises(InputError, match=re.escape(error)):
        lb_maintenance.checked(state, message)


def test_an_empty_message_is_the_default() -> None:
    assert lb_maintenance.checked("on", "  ") == lb_maintenance.DEFAULT_MESSAGE


class Balancer(FakeMachine):
    """Files in memory; `test -e` and `rm -f` act on them; stat answers a fixed time."""

    def _execute(self, command: str, timeout: float) -> Result:
        self.commands.append(command)
        if command.startswith("test -e "):
            return Result(0 if command.split()[-1] in self.files else 1, "", "")
        if command.startswith("rm -f "):
            for path in command.split()[2:]:
                self.files.pop(path, None)
            return Result(0, "", "")
        if command.startswith("stat -c %Y "):
            on = lb_maintenance.HTML_PATH in self.files
            return Result(0, "1796634000\n" if on else "off\n", "")
        return Result(0, "", "")


def test_on_writes_both_pages_once_and_off_removes_them(load, base, use_machines) -> None:
    inventory = load(base)
    made: dict[str, Balancer] = {}
    use_machines(lambda host, timeouts=None: made.setdefault(host.name, Balancer(host)))
    first = lb_maintenance.switch(inventory, "on", "upgrading")
    assert [(o.host.name, o.value) for o in first] == [("lb1", True)]
    content, mode, owner, _ = made["lb1"].files[lb_maintenance.HTML_PATH]
    assert b"<p>upgrading</p>" in content and (mode, owner) == (0o644, "root")
    assert [o.value for o in lb_maintenance.switch(inventory, "on", "upgrading")] == [False]
    assert [o.value for o in lb_maintenance.states(inventory)] == [
        "on since 2026-12-07T09:00:00+00:00"]
    assert [o.value for o in lb_maintenance.switch(inventory, "off")] == [True]
    assert made["lb1"].files == {}
    assert [o.value for o in lb_maintenance.switch(inventory, "off")] == [False]
    assert [o.value for o in lb_maintenance.states(inventory)] == ["off"]


def test_an_upgrade_in_maintenance_turns_it_off_only_once_it_succeeded(load, base,
                                                                       use_machines) -> None:
    inventory = load(base)
    made: dict[str, Balancer] = {}
    use_machines(lambda host, timeouts=None: made.setdefault(host.name, Balancer(host)))
    with lb_maintenance.held_during(inventory, "upgrading"):
        assert lb_maintenance.HTML_PATH in made["lb1"].files
    assert made["lb1"].files == {}
    with pytest.raises(DifyopsError) as failed, \
            lb_maintenance.held_during(inventory, "upgrading"):
        raise HostError("api2: not healthy within 300 s")
    assert str(failed.value) == ("api2: not healthy within 300 s\nThe balancers stay in "
                                 "maintenance: once Dify serves again, run inv lb.maintenance off")
    assert lb_maintenance.HTML_PATH in made["lb1"].files
