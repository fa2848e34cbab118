"""The coordinator seen from another host: a site in its own network namespace.

Loopback tests cannot tell "only from the coordinator's machine" from "from
anywhere": every process shares one network stack. Here a Linux network
namespace with a veth pair plays a hospital on another machine (10.99.x.2)
and `medae server` listens on the host side (10.99.x.1). From the site's
network: the SuperLink's own port is unreachable, the Control API through
the public port is refused, and a `medae client` joins the federation.

Needs root (CAP_NET_ADMIN) and iproute2; skipped with the reason otherwise.
Everything it creates (namespace, veth, processes) is removed in `finally`.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medae.cli import main
from medae.deploy import free_port

pytestmark = pytest.mark.slow

PROBE = """
import json, socket, ssl, sys
import httpx
host, public, internal, ca = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
out = {}
s = socket.socket(); s.settimeout(5)
try:
    s.connect((host, internal)); out["internal"] = "connected"
except OSError as exc:
    out["internal"] = type(exc).__name__
context = ssl.create_default_context(cafile=ca)
for call in ("start-run", "list-runs", "pull-artifacts"):
    out[call] = httpx.post(f"https://{host}:{public}/v1/control/{call}", content=b"", verify=context).status_code
out["health"] = httpx.get(f"https://{host}:{public}/health", verify=context).status_code
print(json.dumps(out))
"""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def site_network():
    """(namespace, coordinator address) or skip."""
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("needs root and iproute2 to make a network namespace")
    tag = f"{os.getpid() % 10000}"
    ns, host_if, site_if = f"medae{tag}", f"vmc{tag}", f"vms{tag}"
    subnet = 10 + os.getpid() % 200
    try:
        _ip("netns", "add", ns)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot make a network namespace here: {exc.stderr.decode().strip()}")
    try:
        _ip("link", "add", host_if, "type", "veth", "peer", "name", site_if)
        _ip("link", "set", site_if, "netns", ns)
        _ip("addr", "add", f"10.99.{subnet}.1/24", "dev", host_if)
        _ip("link", "set", host_if, "up")
        _ip("netns", "exec", ns, "ip", "addr", "add", f"10.99.{subnet}.2/24", "dev", site_if)
        _ip("netns", "exec", ns, "ip", "link", "set", site_if, "up")
        _ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
        yield ns, f"10.99.{subnet}.1"
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", host_if], capture_output=True, timeout=30)


def test_from_a_sites_network_only_the_fleet_api_is_reachable_and_the_site_joins(
        site_network, tmp_path, tiny_benchmark):
    ns, coordinator = site_network
    certs, keys, authorized = tmp_path / "certs", tmp_path / "keys", tmp_path / "authorized"
    assert main(["certs", "--out", str(certs), "--server-name", coordinator]) == 0
    assert main(["keys", "--out", str(keys), "--site", "hospital-a"]) == 0
    authorized.mkdir()
    (authorized / "hospital-a.pub").write_bytes((keys / "hospital-a.pub").read_bytes())
    port, internal = free_port(), free_port()
    env = dict(os.environ, MEDAE_HOME=str(tmp_path / "home"))
    server_log, client_log = tmp_path / "server.log", tmp_path / "client.log"
    server = subprocess.Popen(
        [sys.executable, "-m", "medae", "server", "--certs", str(certs), "--authorized-keys", str(authorized),
         "--out", str(tmp_path / "run"), "--host", "0.0.0.0", "--port", str(port), "--internal-port", str(internal),
         "--rounds", "1"],
        env=env, stdout=open(server_log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    client = None
    try:
        deadline = time.monotonic() + 120
        while "sites connect to" not in server_log.read_text():
            assert server.poll() is None and time.monotonic() < deadline, server_log.read_text()[-2000:]
            time.sleep(0.5)
        probe = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-c", PROBE, coordinator, str(port), str(internal),
             str(certs / "ca.crt")], capture_output=True, text=True, timeout=60)
        assert probe.returncode == 0, probe.stderr
        import json

        seen = json.loads(probe.stdout.strip().splitlines()[-1])
        assert seen["internal"] == "ConnectionRefusedError"  # the SuperLink is not on the network at all
        assert (seen["start-run"], seen["list-runs"], seen["pull-artifacts"]) == (403, 403, 403)
        assert seen["health"] == 200  # the public port itself is reachable from the site

        client = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "medae", "client", "--server", f"{coordinator}:{port}",
             "--ca", str(certs / "ca.crt"), "--key", str(keys / "hospital-a.key"), "--data",
             str(tiny_benchmark / "site-1")],
            env=dict(env, MEDAE_HOME=str(tmp_path / "site-home")), stdout=open(client_log, "w"),
            stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while "site hospital-a is online" not in server_log.read_text():
            assert client.poll() is None, client_log.read_text()[-2000:]
            assert time.monotonic() < deadline, server_log.read_text()[-2000:]
            time.sleep(0.5)
    finally:
        for proc in (client, server):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in (client, server):
            if proc is not None:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)
    assert "site hospital-a is online" in server_log.read_text()
    assert Path(tmp_path / "run" / "logs" / "superlink.log").exists()
