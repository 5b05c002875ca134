"""The rolling update of a cluster (playbooks/cluster-update.yml) on a real HAProxy with stand-in
nodes: role haproxy's drain and ready task files (a drained node finishes what it has and gets
no new request, in every backend, and takes requests again once ready), and the rolling plays
themselves, with a stand-in for role whisper_appliance: one node at a time, each drained while
it is updated, and the first failed health gate stops the rollout with that node drained."""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.request import urlopen

import pytest
import yaml

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
PLAYBOOK = ROOT / "playbooks/cluster-update.yml"
ANSIBLE_PLAYBOOK = shutil.which("ansible-playbook") or str(ROOT / ".venv/bin/ansible-playbook")
HAPROXY = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")
# as in roles/haproxy/vars/main.yml: the proxies the task files find the server in
BACKENDS = ("whisper_https", "whisper_wyoming")


def _env(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_LOCAL_TEMP": str(tmp_path / "tmp"),
        "ANSIBLE_HOME": str(tmp_path / "home"),
    }


def test_playbook_syntax(tmp_path: Path) -> None:
    result = subprocess.run(
        [ANSIBLE_PLAYBOOK, "--syntax-check", "-i", "inventory/cluster.example.yml", str(PLAYBOOK)],
        capture_output=True,
        text=True,
        env=_env(tmp_path),
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


class _Node(ThreadingHTTPServer):
    """A stand-in appliance node: healthy on its version, counts the requests that are not
    health checks; GET /install?version=V (the stand-in role) switches it to V."""

    daemon_threads = True

    def __init__(self, name: str) -> None:
        self.name = name
        self.version = "1.0"
        self.requests: Counter[str] = Counter()
        # /slow holds its request (a session on the node) until the test sets this
        self.release = threading.Event()
        # what the test wants to know at each install (HAProxy's view of the nodes)
        self.on_install: Callable[[], object] = lambda: None
        self.installs: list[object] = []
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Node

    def do_GET(self) -> None:
        node = self.server
        if self.path == "/slow":
            node.release.wait(timeout=60)
        if self.path.startswith("/install?version="):
            node.installs.append(node.on_install())
            node.version = self.path.partition("=")[2]
        if self.path != "/health":
            node.requests[self.path] += 1
        body = json.dumps({"status": "ok", "version": node.version, "node": node.name}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the health checks come every 200 ms."""


class _Haproxy:
    def __init__(self, tmp_path: Path, nodes: list[_Node]) -> None:
        self.socket = tmp_path / "admin.sock"
        self.port = free_port()
        servers = "".join(f"    server {n.name} 127.0.0.1:{n.server_address[1]}\n" for n in nodes)
        check = "    option httpchk GET /health\n    default-server check inter 200ms rise 1\n"
        config = tmp_path / "haproxy.cfg"
        config.write_text(
            f"global\n    stats socket {self.socket} mode 600 level admin\n"
            "defaults\n    timeout connect 2s\n    timeout check 5s\n"
            "    timeout client 30s\n    timeout server 30s\n"
            f"frontend fe\n    mode http\n    bind 127.0.0.1:{self.port}\n"
            f"    default_backend {BACKENDS[0]}\n"
            # the slow request goes to node1 whatever the balancing says
            f"backend {BACKENDS[0]}\n    mode http\n    balance roundrobin\n"
            f"    use-server {nodes[0].name} if {{ path /slow }}\n{check}{servers}"
            # like the Wyoming backend: TCP, the same servers
            f"backend {BACKENDS[1]}\n    mode tcp\n{check}{servers}"
        )
        assert HAPROXY is not None
        self.process = subprocess.Popen(
            [HAPROXY, "-db", "-f", str(config)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )

    def stat(self) -> dict[tuple[str, str], dict[str, str]]:
        """show stat, by (backend, server)."""
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self.socket))
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        rows = csv.DictReader(data.decode().lstrip("# ").splitlines())
        return {(r["pxname"], r["svname"]): r for r in rows if r["pxname"] in BACKENDS}

    def status(self, server: str) -> list[str]:
        """The server's state in each backend, without a transition's count ("UP 2/3" is UP)."""
        stat = self.stat()
        return [stat[(b, server)]["status"].split()[0] for b in BACKENDS]

    def get(self, path: str) -> str:
        with urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=30) as answer:
            return str(json.load(answer)["node"])


def _wait(condition: Any, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[_Haproxy, list[_Node]]]:
    if HAPROXY is None:
        pytest.fail("haproxy is not installed: `make setup` installs it (scripts/bootstrap.sh)")
    nodes = [_Node("node1"), _Node("node2")]
    for node in nodes:
        threading.Thread(target=node.serve_forever, daemon=True).start()
    haproxy = _Haproxy(tmp_path, nodes)
    try:
        _wait(lambda: haproxy.socket.exists())
        _wait(lambda: haproxy.status("node1") == haproxy.status("node2") == ["UP", "UP"])
        yield haproxy, nodes
    finally:
        haproxy.process.terminate()
        output = haproxy.process.communicate(timeout=10)[0]
        for node in nodes:
            node.release.set()
            node.shutdown()
            node.server_close()
        print(output.decode(errors="replace"))


def _start_playbook(
    tmp_path: Path, nodes: list[_Node], plays: list[dict[str, Any]], extra: dict[str, Any]
) -> subprocess.Popen[str]:
    """Runs plays on the stand-in nodes as whisper_appliance hosts, this host being the LB."""
    node_vars = {
        # what cluster.yml gives every node, and where the stand-in listens
        "whisper_appliance_env_extra": {"DATABASE_URL": "postgresql://stand-in"},
        "whisper_appliance_tls_cert_src": "stand-in.crt",
        "whisper_appliance_https_enabled": False,
    }
    inventory = {
        "all": {
            "vars": {
                "ansible_connection": "local",
                "ansible_python_interpreter": "{{ ansible_playbook_python }}",
                # the plays become root on the hosts; here the test's user is enough
                "ansible_become": False,
            },
            "children": {
                "whisper_appliance": {
                    "hosts": {
                        n.name: {"whisper_appliance_https_port": n.server_address[1]} for n in nodes
                    },
                    "vars": node_vars,
                },
                "whisper_lb": {"hosts": {"lb1": None}},
            },
        }
    }
    (tmp_path / "inventory.yml").write_text(yaml.safe_dump(inventory))
    playbook = tmp_path / "playbook.yml"
    playbook.write_text(yaml.safe_dump(plays))
    return subprocess.Popen(
        [
            ANSIBLE_PLAYBOOK,
            "-i",
            str(tmp_path / "inventory.yml"),
            "-e",
            json.dumps(extra),
            playbook,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(tmp_path),
        cwd=ROOT,
    )


def _start_role_tasks(
    tmp_path: Path, cluster: tuple[_Haproxy, list[_Node]], tasks_from: str, server: str = "node1"
) -> subprocess.Popen[str]:
    """Runs role haproxy's task file on a node as cluster-update.yml does."""
    haproxy, nodes = cluster
    task = {"ansible.builtin.include_role": {"name": "haproxy", "tasks_from": tasks_from}}
    play = {"hosts": "node1", "gather_facts": False, "tasks": [task]}
    extra = {
        "__haproxy_socket": str(haproxy.socket),
        "haproxy_drain_server": server,
        "haproxy_drain_timeout": 10,
    }
    return _start_playbook(tmp_path, nodes, [play], extra)


def _finish(playbook: subprocess.Popen[str]) -> tuple[int, str]:
    output = playbook.communicate(timeout=120)[0]
    return playbook.returncode, output


@pytest.mark.slow
def test_drain_then_ready_on_a_real_haproxy(
    tmp_path: Path, cluster: tuple[_Haproxy, list[_Node]]
) -> None:
    haproxy, (node1, node2) = cluster
    slow = threading.Thread(target=haproxy.get, args=("/slow",))
    slow.start()
    _wait(lambda: haproxy.stat()[(BACKENDS[0], "node1")]["scur"] == "1")

    drain = _start_role_tasks(tmp_path, cluster, "drain")
    # drained in every backend at once, then it waits for the session node1 still has
    _wait(lambda: haproxy.status("node1") == ["DRAIN", "DRAIN"], timeout=60)
    time.sleep(2)
    assert drain.poll() is None
    node1.release.set()
    slow.join()
    returncode, output = _finish(drain)
    assert returncode == 0, output
    assert haproxy.status("node1") == ["DRAIN", "DRAIN"]
    assert {haproxy.get("/after-drain") for _ in range(10)} == {"node2"}
    assert (node1.requests["/after-drain"], node2.requests["/after-drain"]) == (0, 10)

    returncode, output = _finish(_start_role_tasks(tmp_path, cluster, "ready"))
    assert returncode == 0, output
    assert haproxy.status("node1") == ["UP", "UP"]
    assert {haproxy.get("/after-ready") for _ in range(10)} == {"node1", "node2"}


@pytest.mark.slow
def test_drain_of_an_unknown_server_fails(
    tmp_path: Path, cluster: tuple[_Haproxy, list[_Node]]
) -> None:
    haproxy, _ = cluster
    returncode, output = _finish(_start_role_tasks(tmp_path, cluster, "drain", server="node3"))
    assert returncode != 0
    assert "failed=1" in output
    assert haproxy.status("node1") == haproxy.status("node2") == ["UP", "UP"]


def _roll_out(
    tmp_path: Path, cluster: tuple[_Haproxy, list[_Node]], installs: dict[str, str]
) -> tuple[int, str]:
    """Runs cluster-update.yml after its import of cluster.yml, with a stand-in for role
    whisper_appliance: release 2.0, each node switched to the version `installs` names."""
    haproxy, nodes = cluster
    for node in nodes:
        node.on_install = lambda: {n.name: haproxy.status(n.name) for n in nodes}
    role = tmp_path / "roles/whisper_appliance"
    (role / "tasks").mkdir(parents=True)
    (role / "defaults").mkdir()
    (role / "defaults/main.yml").write_text(yaml.safe_dump({"whisper_appliance_health_timeout": 6}))
    install = {
        "ansible.builtin.uri": {
            "url": "http://127.0.0.1:{{ whisper_appliance_https_port }}/install"
            "?version={{ stand_in_installs[inventory_hostname] }}"
        }
    }
    release = {"ansible.builtin.set_fact": {"__whisper_appliance_release": "2.0"}}
    (role / "tasks/main.yml").write_text(yaml.safe_dump([release, install]))
    plays = [p for p in yaml.safe_load(PLAYBOOK.read_text()) if "import_playbook" not in str(p)]
    extra = {
        "__haproxy_socket": str(haproxy.socket),
        "haproxy_drain_timeout": 10,
        "stand_in_installs": installs,
    }
    return _finish(_start_playbook(tmp_path, nodes, plays, extra))


@pytest.mark.slow
def test_rolling_update_goes_node_by_node(
    tmp_path: Path, cluster: tuple[_Haproxy, list[_Node]]
) -> None:
    haproxy, (node1, node2) = cluster
    returncode, output = _roll_out(tmp_path, cluster, {"node1": "2.0", "node2": "2.0"})
    assert returncode == 0, output
    # in inventory order, each drained in every backend while the other served
    drained, up = ["DRAIN", "DRAIN"], ["UP", "UP"]
    assert node1.installs == [{"node1": drained, "node2": up}]
    assert node2.installs == [{"node1": up, "node2": drained}]
    assert (node1.version, node2.version) == ("2.0", "2.0")
    assert haproxy.status("node1") == haproxy.status("node2") == up


@pytest.mark.slow
def test_rolling_update_stops_at_the_first_failed_health_gate(
    tmp_path: Path, cluster: tuple[_Haproxy, list[_Node]]
) -> None:
    haproxy, (_, node2) = cluster
    # node1 comes back healthy, but on another version than the release
    returncode, output = _roll_out(tmp_path, cluster, {"node1": "1.9", "node2": "2.0"})
    assert returncode != 0
    assert "Wait until the node's /health is OK on release 2.0" in output
    # node1 stays out of the load balancer, node2 was not touched and serves
    assert haproxy.status("node1") == ["DRAIN", "DRAIN"]
    assert (node2.installs, node2.version, haproxy.status("node2")) == ([], "1.0", ["UP", "UP"])
    assert {haproxy.get("/after") for _ in range(5)} == {"node2"}
