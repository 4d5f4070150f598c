"""harness/hosts.py: network namespaces as hosts. A server on one host is reached from another and
from the machine, a partition cuts it off until healed, and nothing (namespace, link, bridge,
process) outlives the block, even when the code inside it fails."""

from __future__ import annotations

import sys

import pytest

from harness.hosts import Hosts, leftovers, wait_listening
from services.tools.supervisor import free_port

pytestmark = pytest.mark.slow

FETCH = (
    "import sys, urllib.request\n"
    "try:\n"
    "    print(urllib.request.urlopen(sys.argv[1], timeout=2).read().decode())\n"
    "except OSError as exc:\n"
    "    print('unreachable', exc); sys.exit(3)\n"
)


def test_hosts_reach_each_other_a_partition_cuts_one_off_and_teardown_leaves_nothing(tmp_path) -> None:
    (tmp_path / "hello.txt").write_text("hello from host 0")
    port = free_port()
    with Hosts(3) as hosts:
        tag = hosts.tag
        server = hosts.run(
            hosts[0],
            [sys.executable, "-m", "http.server", str(port), "--bind", hosts[0].address],
            cwd=tmp_path,
        )
        wait_listening(hosts[0].address, port)  # from the machine itself, through the bridge
        url = hosts[0].url("http", port) + "/hello.txt"
        assert hosts.check(hosts[1], [sys.executable, "-c", FETCH, url]).stdout.strip() == "hello from host 0"

        hosts.partition(hosts[0])
        cut = hosts.check(hosts[1], [sys.executable, "-c", FETCH, url])
        assert cut.returncode == 3, cut.stdout  # host 1 cannot reach it
        assert hosts.check(hosts[2], [sys.executable, "-c", FETCH, hosts[1].url("http", 1)]).returncode == 3
        assert server.poll() is None  # partitioned, not dead

        hosts.heal(hosts[0])
        healed = hosts.check(hosts[2], [sys.executable, "-c", FETCH, url])
        assert healed.stdout.strip() == "hello from host 0", healed.stdout
        assert hosts[0].name in leftovers(tag)  # while open, the namespaces are there
    assert leftovers(tag) == []
    assert server.poll() is not None


def test_teardown_happens_when_the_test_inside_fails() -> None:
    with pytest.raises(RuntimeError, match="the test failed"), Hosts(2) as hosts:
        tag = hosts.tag
        hosts.run(hosts[1], ["sleep", "300"])
        stray = hosts.check(hosts[0], ["sh", "-c", "sleep 300 >/dev/null 2>&1 & echo $!"])
        assert stray.stdout.strip().isdigit()  # started inside, not through run(): close finds it too
        raise RuntimeError("the test failed")
    assert leftovers(tag) == []
