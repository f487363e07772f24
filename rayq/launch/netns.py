"""A Ray cluster on shaped links, from Python: ``clusters/netns-cluster.sh``, its state, and checks of its links.

:class:`NetnsCluster` starts and stops the script's cluster (a head in the root network namespace,
worker nodes each in their own namespace behind a veth pair and a bridge, every link shaped both ways
with tc from a node profile), re-shapes its links, cuts a node off and heals it, and lists what it made
(namespaces, links, processes) so a test can check that ``stop`` left nothing behind.
:func:`timed_transfer` sends a few MB between two namespaces over TCP and times them (the shaping
check); :func:`gloo_peers` lists the TCP connections between worker addresses (collectives crossing the
bridge). ``python -m rayq.launch.netns plan PROFILE N`` prints the tc settings the script applies:
``i up_bps down_bps latency_s`` per node, from :func:`rayq.profiles.load_profile`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "clusters" / "netns-cluster.sh"


@dataclass(frozen=True)
class NodeShape:
    """What tc applies to worker node ``i`` (1-based): upload and download rates, one-way latency of a hop."""

    node: int
    up_bps: float
    down_bps: float
    latency_s: float


def plan(profile: str | Path, workers: int, seed: int = 0) -> list[NodeShape]:
    """The shaping of each worker node's link from a node profile (as ``rayq.netsim`` models the same profile)."""
    from rayq.profiles import load_profile

    links = load_profile(profile, workers, seed).links
    return [NodeShape(i + 1, lk.up_bps, lk.down_bps, lk.latency_s) for i, lk in enumerate(links)]


def unavailable() -> str | None:
    """Why shaped namespaces cannot be made here (None when they can): not root, no ``ip``/``tc``, no netns."""
    if os.geteuid() != 0:
        return "network namespaces, veth pairs and tc need root"
    for tool in ("ip", "tc", "ss"):
        if shutil.which(tool) is None:
            return f"the {tool!r} command (iproute2) is missing"
    if not SCRIPT.is_file():
        return f"{SCRIPT} is missing (a source checkout is needed)"
    probe = f"rqprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"'ip netns add' failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


class ClusterError(RuntimeError):
    """The script failed; the message holds its output."""


@dataclass
class NetnsCluster:
    """``clusters/netns-cluster.sh`` with these settings (see the script for each); a context manager."""

    workers: int = 4
    profile: str = "shaped-100m"
    state_dir: Path = field(default_factory=lambda: Path(f"/tmp/rqn-{os.getuid()}"))
    prefix: str = "rqn"
    net: str = "10.77.0"
    gcs_port: int = 6391
    dashboard_port: int = 8267
    worker_cpus: float = 1
    loss_pct: float = 0.0

    def env(self) -> dict[str, str]:
        return {**os.environ, "RAYQ_NETNS_DIR": str(self.state_dir), "RAYQ_NETNS_PREFIX": self.prefix,
                "RAYQ_NETNS_NET": self.net, "RAYQ_WORKERS": str(self.workers), "RAYQ_PROFILE": str(self.profile),
                "RAYQ_GCS_PORT": str(self.gcs_port), "RAYQ_DASHBOARD_PORT": str(self.dashboard_port),
                "RAYQ_WORKER_CPUS": f"{self.worker_cpus:g}", "RAYQ_LOSS": f"{self.loss_pct:g}"}

    def run(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        r = subprocess.run(["bash", str(SCRIPT), *args], env=self.env(), capture_output=True, text=True,
                           timeout=timeout)
        if check and r.returncode != 0:
            raise ClusterError(f"netns-cluster.sh {' '.join(args)} failed ({r.returncode}):\n{r.stdout}{r.stderr}")
        return r

    # -- life cycle --------------------------------------------------------------------------------------
    def start(self) -> str:
        return self.run("start").stdout

    def stop(self) -> str:
        return self.run("stop", timeout=120).stdout

    def __enter__(self) -> NetnsCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def shape(self, profile: str) -> None:
        self.run("shape", str(profile))
        self.profile = str(profile)

    def cut(self, node: int) -> None:
        """Node ``node`` (1-based) loses every packet both ways: a partition that keeps its processes."""
        self.run("cut", str(node))

    def heal(self, node: int) -> None:
        self.run("heal", str(node))

    # -- what it is made of ------------------------------------------------------------------------------
    @property
    def address(self) -> str:
        """The head's GCS address, on the bridge (for ``rayq train --address``)."""
        return f"{self.net}.1:{self.gcs_port}"

    def node_ip(self, node: int) -> str:
        return f"{self.net}.{10 + node}"

    def namespace(self, node: int) -> str:
        return f"{self.prefix}w{node}"

    def interface(self, node: int) -> str:
        """The namespace side of the node's veth pair (its GLOO_SOCKET_IFNAME)."""
        return f"{self.prefix}p{node}"

    @property
    def netem(self) -> bool:
        """Whether the links carry the profile's latency (netem); without it only the rate is shaped."""
        path = self.state_dir / "netem"
        return path.is_file() and path.read_text().strip() == "1"

    def made(self) -> list[tuple[str, str]]:
        """What start made and stop removes: ``(kind, name)`` with kind ``link`` or ``netns``."""
        path = self.state_dir / "made"
        return [tuple(line.split()) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []

    def pids(self) -> list[int]:
        """The cluster's processes (its sessions, everything in its namespaces, and their children)."""
        r = self.run("status", check=False)
        line = next((ln for ln in r.stdout.splitlines() if ln.startswith("processes:")), "processes:")
        return [int(p) for p in line.split(":", 1)[1].split()]

    def qdiscs(self, node: int) -> tuple[str, str]:
        """``tc qdisc show`` of the node's upload (namespace side) and download (root side) interfaces."""
        up = subprocess.run(["ip", "netns", "exec", self.namespace(node), "tc", "qdisc", "show", "dev",
                             self.interface(node)], capture_output=True, text=True).stdout
        down = subprocess.run(["tc", "qdisc", "show", "dev", f"{self.prefix}v{node}"], capture_output=True,
                              text=True).stdout
        return up, down


def existing_namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def existing_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if line.count(":") >= 2}


# ------------------------------------------------------------------------------------------- link checks

_RECEIVER = r"""
import socket, sys
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], 0)); srv.listen(1); print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept(); conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
for _ in range(int(sys.argv[2])):
    conn.recv(1); conn.sendall(b"p")
want, got = int(sys.argv[3]), 0
while got < want:
    chunk = conn.recv(1 << 20)
    if not chunk:
        break
    got += len(chunk)
conn.sendall(b"k"); conn.close()
"""

_SENDER = r"""
import json, socket, statistics, sys, time
conn = socket.create_connection((sys.argv[1], int(sys.argv[2]))); conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
rtts = []
for _ in range(int(sys.argv[3])):
    t = time.perf_counter(); conn.sendall(b"p"); conn.recv(1); rtts.append(time.perf_counter() - t)
data = bytes(int(sys.argv[4])); t = time.perf_counter()
conn.sendall(data); conn.recv(1)
print(json.dumps({"seconds": time.perf_counter() - t, "rtt_s": statistics.median(rtts) if rtts else None}))
"""


@dataclass(frozen=True)
class Transfer:
    """A timed TCP transfer between two nodes: bytes, seconds (send until the receiver's ack), median RTT."""

    nbytes: int
    seconds: float
    rtt_s: float | None

    @property
    def bps(self) -> float:
        return 8 * self.nbytes / self.seconds


def timed_transfer(cluster: NetnsCluster, src: int, dst: int, nbytes: int = 8_000_000, pings: int = 20) -> Transfer:
    """Send ``nbytes`` from node ``src`` to node ``dst`` over TCP (after ``pings`` 1-byte round trips) and time it.

    The bytes cross src's upload shaping and dst's download shaping: expect about the smaller rate
    (less one round trip and TCP's slow start) and an RTT of about twice the one-way hop latency.
    """
    py = sys.executable
    rx = subprocess.Popen(["ip", "netns", "exec", cluster.namespace(dst), py, "-c", _RECEIVER, cluster.node_ip(dst),
                           str(pings), str(nbytes)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        port = rx.stdout.readline().strip()
        if not port:
            raise ClusterError(f"the receiver in {cluster.namespace(dst)} did not start: {rx.stderr.read()}")
        tx = subprocess.run(["ip", "netns", "exec", cluster.namespace(src), py, "-c", _SENDER, cluster.node_ip(dst),
                             port, str(pings), str(nbytes)], capture_output=True, text=True, timeout=300)
        if tx.returncode != 0:
            raise ClusterError(f"the sender in {cluster.namespace(src)} failed: {tx.stderr}")
        out = json.loads(tx.stdout)
        rx.wait(timeout=30)
    finally:
        if rx.poll() is None:
            rx.kill()
            rx.wait()
    return Transfer(nbytes, out["seconds"], out["rtt_s"])


def gloo_peers(cluster: NetnsCluster) -> dict[int, set[str]]:
    """Per worker node, the worker addresses it holds established TCP connections with (gloo's pairs)."""
    workers = {cluster.node_ip(i) for i in range(1, cluster.workers + 1)}
    out: dict[int, set[str]] = {}
    for i in range(1, cluster.workers + 1):
        ss = subprocess.run(["ip", "netns", "exec", cluster.namespace(i), "ss", "-tnH", "state", "established"],
                            capture_output=True, text=True).stdout
        peers = set()
        for line in ss.splitlines():
            parts = line.split()
            if len(parts) >= 4:
                local, peer = parts[-2].rpartition(":")[0], parts[-1].rpartition(":")[0]
                if local == cluster.node_ip(i) and peer in workers and peer != local:
                    peers.add(peer)
        out[i] = peers
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3 or argv[0] != "plan":
        print("usage: python -m rayq.launch.netns plan PROFILE WORKERS", file=sys.stderr)
        return 2
    from rayq.schema import ConfigError

    try:
        shapes = plan(argv[1], int(argv[2]))
    except (ConfigError, ValueError) as err:
        print(f"netns plan: {err}", file=sys.stderr)
        return 2
    for s in shapes:
        print(f"{s.node} {s.up_bps:.0f} {s.down_bps:.0f} {s.latency_s:.9f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
