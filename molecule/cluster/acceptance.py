"""Issue 16's acceptance on the real cluster, through HAProxy's address (and each node's own, to
show which node did what): admin login and an API key on both nodes, history written via node A
found by search via node B, a live session and a Wyoming request, throughput of two nodes
against one, and a node killed (`pct stop`) while jobs are queued and running. Prints one JSON
line of measurements; any failed check exits non-zero with the reason.

usage: acceptance.py CONFIG_JSON   (admin password on stdin)
CONFIG_JSON: {"lb": ADDRESS, "stats_password": ..., "ca": CA_FILE, "clips": [WAV...],
              "speech": WAV with JFK's words, "pct": PCT, "lxcpath": LXCPATH,
              "nodes": [{"name", "address", "vmid", "cpuset"}, ...]}
`acceptance.py CONFIG_JSON loop -- CMD...` runs CMD with a request loop against the load
balancer (with a new API key) and fails if any request of the loop failed (the rolling
update's check). `acceptance.py CONFIG_JSON throughput` measures only the throughput, on a
cluster that is up, to repeat it.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import os
import socket
import ssl
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
import wave
from base64 import b64encode
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import websockets

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "shared"))
from update import Admin  # type: ignore[import-not-found]  # molecule/shared/update.py

JOB_TIMEOUT = 600  # a batch, or the jobs of a killed node (their lease must run out first)
WYOMING_PORT = 10300
BATCH_SECONDS = 120  # one node's work in the throughput batch, as one JFK round trip rates it
BACKENDS = ("whisper_https", "whisper_wyoming")
ATTEMPTS = 3  # two-node runs at most, each between two one-node runs
MAX_RATIO = 2.7  # see the last check of `throughput`
STEADY = 0.15  # how far the one-node runs around a two-node run may differ (per core-second)


class Cluster:
    """The load balancer and the nodes, as a client sees them, plus the host's `pct`."""

    def __init__(self, config: dict[str, Any], password: str) -> None:
        self.config = config
        self.ca = config["ca"]
        self.lb = f"https://{config['lb']}"
        self.nodes = config["nodes"]
        self.context = ssl.create_default_context(cafile=self.ca)
        self.admin = Admin(self.lb, self.ca, password)
        self.key = ""

    # --- HTTP ------------------------------------------------------------------------------
    def request(
        self,
        base: str,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        key: str | None = None,
    ) -> tuple[int, Any]:
        """One request with the API key (unless `key` says otherwise); JSON answers parsed."""
        token = self.key if key is None else key
        auth = {"Authorization": f"Bearer {token}"} if token else {}
        request = urllib.request.Request(  # noqa: S310 - the test's own https:// addresses
            base + path, data=body, method=method, headers={**auth, **(headers or {})}
        )
        try:
            with urllib.request.urlopen(request, context=self.context, timeout=120) as r:  # noqa: S310
                status, raw = r.status, r.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, raw[:300].decode(errors="replace")

    def upload(self, base: str, path: str, audio: Path, filename: str) -> tuple[int, Any]:
        boundary = uuid.uuid4().hex
        body = b"".join(
            [
                f"--{boundary}\r\n".encode(),
                f'Content-Disposition: form-data; name="file"; filename="{filename}"\r\n'.encode(),
                b"Content-Type: audio/wav\r\n\r\n",
                audio.read_bytes(),
                f"\r\n--{boundary}--\r\n".encode(),
            ]
        )
        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        return self.request(base, "POST", path, body, headers)

    def node_url(self, node: dict[str, Any]) -> str:
        return f"https://{node['address']}:5001"

    def new_key(self) -> None:
        """An API key from the admin API (through the LB) for the requests that follow."""
        self.admin.login()
        name = f"molecule-{uuid.uuid4().hex[:8]}"
        status, made = self.admin.post_json("/admin/api/keys", {"name": name})
        check(status in (200, 201), f"POST /admin/api/keys: HTTP {status}: {made}")
        self.key = made["key"]

    # --- HAProxy and the containers ---------------------------------------------------------
    def server_states(self) -> dict[tuple[str, str], str]:
        """(backend, server) -> UP/DOWN/MAINT/... from the stats page's CSV export."""
        password = self.config["stats_password"]
        request = urllib.request.Request(
            f"https://{self.config['lb']}:8404/;csv",
            headers={"Authorization": "Basic " + b64encode(f"admin:{password}".encode()).decode()},
        )
        with urllib.request.urlopen(request, context=self.context, timeout=10) as r:  # noqa: S310
            rows = csv.reader(io.StringIO(r.read().decode().lstrip("# ")))
            head = next(rows)
            status = head.index("status")
            return {(row[0], row[1]): row[status] for row in rows if row and row[0] in BACKENDS}

    def wait_state(self, node: dict[str, Any], state: str, timeout: float = 120) -> float:
        """Wait until HAProxy shows the node `state` in both back ends; returns when."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = self.server_states()
            if all(states.get((b, node["name"]), "").startswith(state) for b in BACKENDS):
                return time.time()
            time.sleep(0.2)
        raise SystemExit(f"{node['name']} not {state} in HAProxy after {timeout} s: {states}")

    def pct(self, *args: str) -> None:
        subprocess.run([self.config["pct"], *args], check=True)

    def pin(self, node: dict[str, Any]) -> None:
        """The node's cpuset (the pct stand-in rewrites the LXC config at each start)."""
        subprocess.run(
            ["lxc-cgroup", "-P", self.config["lxcpath"], "-n", str(node["vmid"]),
             "cpuset.cpus", node["cpuset"]],
            check=True,
        )  # fmt: skip

    def service(self, node: dict[str, Any], action: str) -> None:
        self.pct("exec", str(node["vmid"]), "--", "systemctl", action, "whisper-appliance.service")

    # --- jobs -------------------------------------------------------------------------------
    def submit(self, clips: list[Path], tag: str) -> list[str]:
        ids = []
        for n, clip in enumerate(clips):
            status, answer = self.upload(self.lb, "/api/jobs", clip, f"{tag}-{n}-{clip.name}")
            check(status == 202, f"POST /api/jobs: HTTP {status}: {answer}")
            ids.append(answer["id"])
        return ids

    def wait_jobs(self, ids: list[str]) -> list[dict[str, Any]]:
        """Every job finished (asked through the load balancer), their final snapshots. One
        job polled at a time, in queue order: polling them all would load the nodes under
        measurement."""
        deadline = time.monotonic() + JOB_TIMEOUT
        jobs = []
        for job_id in ids:
            while True:
                status, job = self.request(self.lb, "GET", f"/api/jobs/{job_id}")
                check(status == 200, f"GET /api/jobs/{job_id}: HTTP {status}: {job}")
                if job["state"] in ("done", "failed", "cancelled"):
                    break
                check(time.monotonic() < deadline, f"jobs unfinished after {JOB_TIMEOUT} s")
                time.sleep(1)
            jobs.append(job)
        bad = [j for j in jobs if j["state"] != "done" or not j["history_id"]]
        check(not bad, f"jobs not done: {bad}")
        return jobs

    def state(self, job_id: str) -> str:
        status, job = self.request(self.lb, "GET", f"/api/jobs/{job_id}")
        check(status == 200, f"GET /api/jobs/{job_id}: HTTP {status}: {job}")
        return str(job["state"])


def audio_seconds(clip: Path) -> float:
    with wave.open(str(clip)) as w:
        return float(w.getnframes() / w.getframerate())


def check(condition: bool, message: str) -> None:
    if not condition:
        raise SystemExit(f"FAILED: {message}")


def words(text: str) -> str:
    return " ".join("".join(c for c in text.lower() if c.isalpha() or c == " ").split())


@dataclass
class Run:
    """One batch: its jobs' final snapshots (in the order of `clips`), the saturated window
    [accepted, end] and the share of their cores the nodes got in it."""

    clips: list[Path]
    jobs: list[dict[str, Any]]
    accepted: float
    end: float
    share: float
    nodes: int

    def rate(self, cost: dict[str, float]) -> float:
        """Work done per second of the window, per core-second the nodes got.

        Why this window, not jobs / wall time: [last job accepted, last job started] leaves
        out the uploads (the controller, HAProxy and PostgreSQL share the two cores with the
        nodes) and the tail where one node has finished and the other still runs its last
        job; within it the queue is never empty, so each node works at full speed on its own
        core. Jobs cut by the window's ends count by the part of their run inside it.
        Why not audio seconds: a job's cost is far from proportional to its audio (a 3 s
        clip pays most of a 30 s window's encoder pass), so which clips fall in the short
        two-node window swayed the rate by 30 %. A job counts as `cost` of its clip: what
        the clip took on one node alone.
        """
        work = 0.0
        for clip, job in zip(self.clips, self.jobs, strict=True):
            inside = min(job["finished"], self.end) - max(job["started"], self.accepted)
            if inside > 0:
                work += cost[clip.name] * inside / (job["finished"] - job["started"])
        return work / (self.end - self.accepted) / self.share / self.nodes

    def costs(self) -> dict[str, float]:
        """Each clip's median run time in this batch (seconds)."""
        times: dict[str, list[float]] = {}
        for clip, job in zip(self.clips, self.jobs, strict=True):
            times.setdefault(clip.name, []).append(job["finished"] - job["started"])
        return {name: statistics.median(t) for name, t in times.items()}

    def summary(self) -> dict[str, float]:
        audio = sum(j["duration"] for j in self.jobs)
        wall = max(j["finished"] for j in self.jobs) - min(j["started"] for j in self.jobs)
        return {
            "audio_s_per_s": round(audio / wall, 2),
            "core_share": round(self.share, 2),
            "saturated_s": round(self.end - self.accepted, 1),
            "batch_wall_s": round(wall, 1),
        }


def cpu_seconds(vmid: int) -> float:
    """CPU time the container has used (its cgroup; v1 cpuacct or v2 cpu.stat)."""
    v1 = Path(f"/sys/fs/cgroup/cpuacct/lxc.payload.{vmid}/cpuacct.usage")
    if v1.is_file():
        return int(v1.read_text()) / 1e9
    stat = Path(f"/sys/fs/cgroup/lxc.payload.{vmid}/cpu.stat").read_text()
    return int(stat.split("usage_usec ")[1].split()[0]) / 1e6


class CpuMeter:
    """The nodes' CPU time sampled every 0.2 s in a thread, read back at any moment."""

    def __init__(self, vmids: list[int]) -> None:
        self.vmids = vmids
        self.samples: list[tuple[float, float]] = []  # (time, CPU seconds of all the nodes)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(0.2):
            self.samples.append((time.time(), sum(map(cpu_seconds, self.vmids))))

    def at(self, moment: float) -> float:
        before = [s for s in self.samples if s[0] <= moment][-1]
        after = next(s for s in self.samples if s[0] >= moment)
        if after[0] == before[0]:
            return before[1]
        return before[1] + (after[1] - before[1]) * (moment - before[0]) / (after[0] - before[0])


def measure(cluster: Cluster, clips: list[Path], tag: str, nodes: list[dict[str, Any]]) -> Run:
    meter = CpuMeter([n["vmid"] for n in nodes])
    ids = cluster.submit(clips, tag)
    accepted = time.time()  # the containers share the host's clock
    jobs = cluster.wait_jobs(ids)
    meter.stop.set()
    meter.thread.join()
    end = float(max(j["started"] for j in jobs))
    check(end - accepted > 5, f"saturated window only {end - accepted:.1f} s: more rounds")
    # Share of their cores the nodes got in the window: below 1 when PostgreSQL, HAProxy,
    # this script or another scenario took CPU from them.
    share = (meter.at(end) - meter.at(accepted)) / (end - accepted) / len(nodes)
    return Run(clips, jobs, accepted, end, share, len(nodes))


PARTNER = "import numpy as np\na = np.ones((256, 256), np.float32)\nwhile True:\n    a @ a\n"


@contextlib.contextmanager
def other_core_busy(cpuset: str) -> Iterator[None]:
    """A CPU-bound loop on the stopped node's core while node 1 runs alone.

    Why: on this host (a shared VM) faster-whisper on one vCPU ran 20-40 % slower per
    CPU-second while the other vCPU idled than while it was busy (measured alternating,
    2026-12-03: 0.77-1.29 clips/s alone, 1.28-1.54 with a second transcription beside it,
    1.32-1.35 with this loop). Without it the one-node runs measured a host state the
    two-node runs never see, and two nodes came out at 2.5-3.5x one. With it both phases
    run with both cores busy, and PostgreSQL, HAProxy and this script compete with a full
    core's load in both.
    """
    loop = subprocess.Popen(
        ["taskset", "-c", cpuset, sys.executable, "-c", PARTNER],
        env={**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"},
    )
    try:
        yield
    finally:
        loop.kill()
        loop.wait()


# --- the checks -------------------------------------------------------------------------------
def logins_and_keys(cluster: Cluster) -> None:
    """Admin login on each node and through the LB; an API key made once works on both nodes,
    and once keys are required (a setting stored in PostgreSQL) no node takes a request
    without one."""
    for base in [cluster.node_url(n) for n in cluster.nodes] + [cluster.lb]:
        admin = Admin(base, cluster.ca, cluster.admin.password)
        admin.login()
        status, answer = admin.call("GET", "/admin/api/status")
        check(status == 200, f"admin status via {base}: HTTP {status}: {answer}")
    cluster.new_key()
    status, answer = cluster.admin.call(
        "PUT", "/admin/api/settings", json.dumps({"require_api_key": True}).encode(),
        {"Content-Type": "application/json"},
    )  # fmt: skip
    check(status == 200, f"PUT /admin/api/settings: HTTP {status}: {answer}")
    for node in cluster.nodes:
        base = cluster.node_url(node)
        check(
            cluster.request(base, "GET", "/api/history")[0] == 200, f"key refused by {node['name']}"
        )
        deadline = time.monotonic() + 30  # the setting reaches the other node by NOTIFY
        while cluster.request(base, "GET", "/api/history", key="")[0] != 401:
            check(time.monotonic() < deadline, f"{node['name']} takes requests without a key")
            time.sleep(0.5)


def history_across(cluster: Cluster, speech: Path) -> float:
    """Written via node A, found by search via node B and through the LB. Returns how long
    the transcription took (seconds)."""
    a, b = cluster.nodes
    name = f"across-{uuid.uuid4().hex[:12]}"
    sent = time.monotonic()
    status, result = cluster.upload(cluster.node_url(a), "/transcribe", speech, f"{name}.wav")
    took = time.monotonic() - sent
    check(
        status == 200 and result.get("id"),
        f"/transcribe via {a['name']}: {status} {result}",
    )
    for base in (cluster.node_url(b), cluster.lb):
        status, found = cluster.request(base, "GET", f"/api/history?q={name}")
        ids = [item["id"] for item in (found or {}).get("items", [])]
        check(status == 200 and ids == [result["id"]], f"search via {base}: {status} {found}")
    return took


async def live_session(cluster: Cluster, speech: Path) -> str:
    """/ws/live through the LB: the clip at about real time, its words in the `end` message."""
    with wave.open(str(speech)) as w:
        pcm = w.readframes(w.getnframes())
    url = f"wss://{cluster.config['lb']}/ws/live"
    headers = {"Authorization": f"Bearer {cluster.key}"}
    async with websockets.connect(url, ssl=cluster.context, additional_headers=headers) as ws:
        await ws.send(json.dumps({"type": "start", "language": "en"}))
        ready = json.loads(await ws.recv())
        check(ready.get("type") == "ready", f"live: {ready} (expected ready)")
        frame = 3200  # 0.1 s
        for offset in range(0, len(pcm), frame):
            await ws.send(pcm[offset : offset + frame])
            await asyncio.sleep(0.06)  # under the 2x real-time limit
        await ws.send(json.dumps({"type": "stop"}))
        async for message in ws:
            event = json.loads(message) if isinstance(message, str) else {}
            check(event.get("type") != "error", f"live: {event}")
            if event.get("type") == "end":
                return str(event["text"])
    raise SystemExit("FAILED: live session closed without `end`")


def wyoming(cluster: Cluster, speech: Path) -> str:
    """A Wyoming transcription through HAProxy's TCP front end."""
    with wave.open(str(speech)) as w:
        rate, width, channels, pcm = (
            w.getframerate(),
            w.getsampwidth(),
            w.getnchannels(),
            w.readframes(w.getnframes()),
        )
    fmt = {"rate": rate, "width": width, "channels": channels}
    with socket.create_connection((cluster.config["lb"], WYOMING_PORT), timeout=120) as sock:
        stream = sock.makefile("rwb")

        def send(kind: str, data: dict[str, Any], payload: bytes = b"") -> None:
            body = json.dumps(data).encode()
            header = {"type": kind, "data_length": len(body), "payload_length": len(payload)}
            stream.write(json.dumps(header).encode() + b"\n" + body + payload)

        send("transcribe", {"language": "en"})
        send("audio-start", fmt)
        for offset in range(0, len(pcm), 32000):
            send("audio-chunk", fmt, pcm[offset : offset + 32000])
        send("audio-stop", {})
        stream.flush()
        while line := stream.readline():
            header = json.loads(line)
            data = header.get("data") or {}
            if header.get("data_length"):
                data = json.loads(stream.read(header["data_length"]))
            if header.get("payload_length"):
                stream.read(header["payload_length"])
            check(header["type"] != "error", f"wyoming: {data}")
            if header["type"] == "transcript":
                return str(data["text"])
    raise SystemExit("FAILED: Wyoming connection closed without a transcript")


def throughput(cluster: Cluster, clips: list[Path]) -> dict[str, Any]:
    """The same batch on node 1 alone (node 2's service stopped: its workers would otherwise
    claim jobs from the shared queue whatever HAProxy does), on both nodes, then on node 1
    alone again, and so on. This host is a shared VM whose speed changed 3-5x between two
    phases a minute apart: a ratio counts only from an attempt whose two one-node runs, just
    before and just after its two-node run, agree within STEADY; each attempt's last one-node
    run is the next one's first."""
    node1, node2 = cluster.nodes

    def nodes(count: int) -> None:
        cluster.service(node2, "start" if count == 2 else "stop")
        cluster.wait_state(node2, "UP" if count == 2 else "DOWN")

    nodes(1)
    with other_core_busy(node2["cpuset"]):
        before = measure(cluster, clips, "one", [node1])
    attempts = []
    for _ in range(ATTEMPTS):
        nodes(2)
        two = measure(cluster, clips, "two", cluster.nodes)
        nodes(1)
        with other_core_busy(node2["cpuset"]):
            after = measure(cluster, clips, "one", [node1])
        # Work in seconds of node 1 alone on each clip, as the first one-node run took it.
        # The nodes have a core each, PostgreSQL, HAProxy and this script none: on this
        # 2-core machine they take their CPU from the nodes, from both when both run, while
        # one node leaves them the other core. The ratio that asks whether the cluster scales
        # compares the work per core-second the nodes actually got (times the cores).
        cost = before.costs()
        one_a, both, one_b = (run.rate(cost) for run in (before, two, after))
        spread = max(one_a, one_b) / min(one_a, one_b) - 1
        ratio = 2 * both / ((one_a + one_b) / 2)
        attempt = {
            "one_node": before.summary(),
            "two_nodes": two.summary(),
            "one_node_again": after.summary(),
            "work_per_core_s": [round(one_a, 3), round(both, 3), round(one_b, 3)],
            "one_node_spread": round(spread, 3),
            "ratio": round(ratio, 2),
        }
        attempts.append(attempt)
        print(json.dumps({"throughput_attempt": attempt}), flush=True)
        if spread <= STEADY:
            break
        before = after
    nodes(2)
    result = {**attempts[-1], "attempts": len(attempts), "jobs": len(clips)}
    print(json.dumps({"throughput": result}), flush=True)
    check(
        spread <= STEADY,
        f"the host's speed changed by more than {STEADY:.0%} around every two-node run"
        f" ({ATTEMPTS} attempts): no fair ratio to take; run again on a quiet machine: {attempts}",
    )
    check(ratio >= 1.8, f"two nodes {ratio:.2f}x one node (< 1.8x): {result}")
    # Above 2x per core is this host, not the cluster: the loop on the idle core recovers
    # most of a lone vCPU's loss, not all (1.32-1.35 clips/s with it, 1.51-1.54 beside a
    # second transcription: up to 1.17x), plus the STEADY allowance: 2 x 1.17 x 1.15 = 2.7.
    # More than that is a run disturbed in a way the one-node runs around it did not see.
    check(
        ratio <= MAX_RATIO, f"two nodes {ratio:.2f}x one node (> {MAX_RATIO}x): disturbed: {result}"
    )
    return result


class RequestLoop:
    """Requests through the LB in a thread (health, a history search and a new job in turn),
    each noted with the time it was sent and whether it failed; the jobs it got accepted."""

    REQUESTS = ("GET /health", "GET /api/history?q=x", "POST /api/jobs")

    def __init__(self, cluster: Cluster, speech: Path) -> None:
        self.cluster, self.speech = cluster, speech
        self.log: list[tuple[float, str, str]] = []  # (sent, what, error or "")
        self.accepted: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            sent = time.time()
            what = self.REQUESTS[n % 3]
            method, path = what.split(" ")
            try:
                if method == "POST":
                    status, answer = self.cluster.upload(
                        self.cluster.lb, path, self.speech, f"loop-{n}.wav"
                    )
                    if status == 202:
                        self.accepted.append(answer["id"])
                else:
                    status, answer = self.cluster.request(self.cluster.lb, method, path)
                error = "" if status in (200, 202) else f"HTTP {status}: {answer}"
            except OSError as exc:  # refused, reset, timed out
                error = repr(exc)
            self.log.append((sent, what, error))
            time.sleep(0.2)

    def __enter__(self) -> RequestLoop:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()

    def failures(self, after: float = 0.0) -> list[tuple[float, str, str]]:
        return [entry for entry in self.log if entry[0] >= after and entry[2]]


def kill_node(cluster: Cluster, clips: list[Path], speech: Path) -> dict[str, Any]:
    """`pct stop` (no shutdown) node 1 while both nodes run jobs and more wait: every accepted
    job ends done (node 1's running one once its lease runs out), requests sent after HAProxy
    marks it DOWN all succeed, and the history rows of every job, finished before or after
    the kill, are there."""
    node1 = cluster.nodes[0]
    ids = cluster.submit(clips, "kill")
    with RequestLoop(cluster, speech) as loop:
        # Two jobs done and the last one waiting: both nodes (one worker each) are busy and
        # more is queued.
        deadline = time.monotonic() + 120
        while not (
            cluster.state(ids[1]) == "done"
            and cluster.state(ids[0]) == "done"
            and cluster.state(ids[-1]) == "queued"
        ):
            check(time.monotonic() < deadline, "never two jobs done with the last one queued")
            time.sleep(0.3)
        killed = time.time()
        cluster.pct("stop", str(node1["vmid"]))
        down = cluster.wait_state(node1, "DOWN")
        jobs = cluster.wait_jobs(ids)
        time.sleep(2)  # a few loop requests after the last job, too
    failures = loop.failures(after=down)
    check(not failures, f"requests failed after node 1 was DOWN: {failures}")
    jobs += cluster.wait_jobs(loop.accepted)
    for job in jobs:
        status, _ = cluster.request(cluster.lb, "GET", f"/api/history/{job['history_id']}")
        check(status == 200, f"history row {job['history_id']} of job {job['id']}: HTTP {status}")
    cluster.pct("start", str(node1["vmid"]))
    cluster.pin(node1)
    cluster.wait_state(node1, "UP", timeout=300)
    result = {
        "jobs": len(jobs),
        "loop_jobs": len(loop.accepted),
        "down_after_s": round(down - killed, 1),
        "loop_requests": len(loop.log),
        "failed_before_down": len(loop.failures()),
    }
    print(json.dumps({"kill": result}), flush=True)
    return result


def main() -> int:
    config = json.loads(Path(sys.argv[1]).read_text())
    cluster = Cluster(config, sys.stdin.readline().strip())
    speech = Path(config["speech"])
    if sys.argv[2:3] == ["loop"]:  # loop -- CMD...
        cluster.new_key()
        with RequestLoop(cluster, speech) as loop:
            done = subprocess.run(sys.argv[4:], check=False)
        check(done.returncode == 0, f"{sys.argv[4:]}: exit status {done.returncode}")
        check(not loop.failures(), f"requests failed during {sys.argv[4:]}: {loop.failures()}")
        jobs = cluster.wait_jobs(loop.accepted)
        print(json.dumps({"loop_requests": len(loop.log), "loop_jobs": len(jobs)}))
        return 0
    clips = [Path(c) for c in config["clips"]]
    throughput_only = sys.argv[2:3] == ["throughput"]  # that part alone, on a cluster up
    if throughput_only:
        cluster.new_key()
    else:
        logins_and_keys(cluster)
    seconds = history_across(cluster, speech)
    # Rounds of the clips for about BATCH_SECONDS of one node's work: long enough that the
    # two-node window is many jobs long whatever this machine's speed. One short request's
    # round trip (upload, queue, model) overrates a job's cost: in the runs of 2026-12-03 the
    # batch took about half of BATCH_SECONDS on one node (26-34 s for 60), and the two-node
    # window of a 60 s batch was 10-13 s, its uploads and tail a large part of the wall time.
    speed = audio_seconds(speech) / seconds
    rounds = max(3, min(40, round(BATCH_SECONDS * speed / sum(map(audio_seconds, clips)))))
    if throughput_only:
        print(json.dumps(throughput(cluster, clips * rounds)))
        return 0
    live = asyncio.run(live_session(cluster, speech))
    # Streaming decodes (tiny.en) garble a word here and there: the session's own words.
    check("my fellow americans" in words(live), f"live transcript: {live!r}")
    spoken = wyoming(cluster, speech)
    check("ask not what your country" in words(spoken), f"Wyoming transcript: {spoken!r}")
    report = {
        "transcribe_speed": round(speed, 1),
        "throughput": throughput(cluster, clips * rounds),
        "kill": kill_node(cluster, clips * max(2, rounds // 2), speech),
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
