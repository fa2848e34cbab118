"""Deployment end to end on loopback: `medae server` and `medae client` as separate processes.

Certificates and keys are made by `medae certs` / `medae keys`, each site's
DICOM folder by `medae make-benchmark`. One coordinator (Flower SuperLink
behind medae's gateway) and three authorized SuperNodes run two rounds; a
fourth site with an unauthorized key and a fifth that does not trust the
server's CA try to join and fail clearly. While the run is on, the Control API
is probed through the public address (refused) and on loopback (served).

Every process is started in its own session and killed in `finally`; the
whole module is bounded by pytest-timeout and by the waits below.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medae.cli import main
from medae.deploy import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]  # the module fixture runs two servers

RUN_TIMEOUT_S = 480
SITES = ("site-a", "site-b", "site-c")
TINY_TOML = """
[model]
channels = [8, 16, 16, 16]
latent_dim = 32
groups = 4

[train]
epochs = 2
batch_size = 8
num_threads = 1

[privacy]
budget_epsilon = 50.0

[federation]
rounds = 2
min_sites = 3  # every round waits for all three hospitals
"""


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _wait_port(port: int, timeout_s: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before listening")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listens on {port}")


def _processes_after_exit(home: Path, grace_s: float = 10.0) -> list[str]:
    """`_processes_of` once Python's multiprocessing resource tracker, which leaves when its parent has
    exited (on the end of its pipe), has had ``grace_s`` to do so; anything else is reported at once."""
    deadline = time.monotonic() + grace_s
    while True:
        found = _processes_of(home)
        if not any("multiprocessing.resource_tracker" in p for p in found) or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def _processes_of(home: Path) -> list[str]:
    """Every live process (any depth, any session) started under the MEDAE_HOME ``home`` or below it."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            state = next(line for line in (proc / "status").read_text().splitlines() if line.startswith("State:"))
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, StopIteration):
            continue
        if "zombie" in state:
            continue
        if any(e.startswith(b"MEDAE_HOME=" + str(home).encode()) for e in environ):
            found.append(f"{proc.name}: {cmdline[:120]}")
    return found


def _listening_addresses(port: int) -> set[str]:
    """IPv4/IPv6 addresses with a listening TCP socket on ``port`` (from /proc/net/tcp*)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _control_probe(address: str, ca: Path) -> dict[str, str]:
    """Start a run, list runs and pull artifacts with Flower's own Control client; what each answered."""
    from flwr.cli.typing import SuperLinkConnection
    from flwr.cli.utils import init_http_client_from_connection
    from flwr.proto.control_pb2 import (  # pylint: disable=no-name-in-module
        ListRunsRequest,
        PullArtifactsRequest,
        StartRunRequest,
    )

    client = init_http_client_from_connection(
        SuperLinkConnection(name="probe", address=address, root_certificates=str(ca))
    )
    answers = {}
    for name, call in (("list-runs", lambda: client.ListRuns(ListRunsRequest())),
                       ("start-run", lambda: client.StartRun(StartRunRequest())),
                       ("pull-artifacts", lambda: client.PullArtifacts(PullArtifactsRequest(run_id=1)))):
        try:
            call()
            answers[name] = "served"
        except Exception as exc:  # noqa: BLE001 - the answer is what we record
            answers[name] = f"{type(exc).__name__}: {exc}"
    return answers


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    certs, other_ca, keys, authorized = root / "certs", root / "other-ca", root / "keys", root / "authorized"
    assert main(["certs", "--out", str(certs), "--server-name", "127.0.0.1"]) == 0
    assert main(["certs", "--out", str(other_ca), "--server-name", "127.0.0.1"]) == 0
    for site in (*SITES, "rogue"):
        assert main(["keys", "--out", str(keys), "--site", site]) == 0
    authorized.mkdir()
    for site in SITES:  # the coordinator authorizes the three hospitals, not "rogue"
        (authorized / f"{site}.pub").write_bytes((keys / f"{site}.pub").read_bytes())
    data = root / "data"
    assert main(["make-benchmark", "--out", str(data), "--sites", "3", "--patients", "6"]) == 0
    before = _tree(data)
    config = root / "tiny.toml"
    config.write_text(TINY_TOML)
    port = free_port()
    internal = free_port()
    run_dir = root / "run"
    logs = root / "logs"
    logs.mkdir()

    procs: dict[str, subprocess.Popen] = {}

    def start(name: str, *args: str) -> None:
        env = dict(os.environ, MEDAE_HOME=str(root / "home" / name), FLWR_TELEMETRY_ENABLED="0")
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", "medae", *args], env=env, cwd=root, start_new_session=True,
            stdout=open(logs / f"{name}.log", "w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )

    server_addr = f"127.0.0.1:{port}"
    result: dict = {"run_dir": run_dir, "data": data, "before": before, "logs": logs, "homes": root / "home"}
    server_args = ("server", "--certs", str(certs), "--authorized-keys", str(authorized), "--config", str(config),
                   "--out", str(run_dir), "--host", "127.0.0.1", "--port", str(port), "--internal-port", str(internal))
    try:
        start("server", *server_args, "--rounds", "1")
        for i, site in enumerate(SITES, start=1):
            start(site, "client", "--server", server_addr, "--ca", str(certs / "ca.crt"), "--key",
                  str(keys / f"{site}.key"), "--data", str(data / f"site-{i}"), "--config", str(config))
        _wait_port(port, 120, procs["server"])
        start("rogue", "client", "--server", server_addr, "--ca", str(certs / "ca.crt"), "--key",
              str(keys / "rogue.key"), "--data", str(data / "site-1"), "--config", str(config))
        start("wrong-ca", "client", "--server", server_addr, "--ca", str(other_ca / "ca.crt"), "--key",
              str(keys / "site-a.key"), "--data", str(data / "site-1"), "--config", str(config))
        # The SuperLink (Fleet + Control + runtime APIs) listens on loopback only; the public port is the gateway.
        result["superlink_listens_on"] = _listening_addresses(internal)
        # The Control API, through the public address and on the coordinator's loopback.
        result["public"] = _control_probe(server_addr, certs / "ca.crt")
        result["loopback"] = _control_probe(f"127.0.0.1:{internal}", certs / "ca.crt")
        for name in ("rogue", "wrong-ca"):
            result[f"{name}_rc"] = procs[name].wait(timeout=120)
        result["first_rc"] = procs["server"].wait(timeout=RUN_TIMEOUT_S)
        # medae server stopped its SuperLink, SuperExec and ServerApp processes itself.
        result["server_processes_after_exit"] = _processes_after_exit(root / "home" / "server")
        result["after_first"] = json.loads((run_dir / "metrics.json").read_text())
        # The coordinator restarts the server with the same run folder and one more round: it resumes,
        # and the sites' clients, still running, join the new SuperLink by themselves.
        start("server-again", *server_args, "--rounds", "2")
        result["server_rc"] = procs["server-again"].wait(timeout=RUN_TIMEOUT_S)
    finally:
        # As `docker stop` or an operator would: SIGTERM to each medae process only. Each must stop
        # the Flower processes it started (other sessions) before it exits.
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while _processes_of(root / "home") and time.monotonic() < deadline:
            time.sleep(0.5)
        result["left_running"] = _processes_of(root / "home")
        for proc in procs.values():  # clean up after a failure, whatever it left
            if _group_alive(proc.pid):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        for line in result["left_running"]:
            os.kill(int(line.split(":")[0]), signal.SIGKILL)
        result["output"] = {n: (logs / f"{n}.log").read_text(errors="replace") for n in procs}
    return result


def test_two_rounds_complete_and_the_bundle_is_written(deployment):
    assert deployment["first_rc"] == 0, deployment["output"]["server"][-3000:]
    assert deployment["server_rc"] == 0, deployment["output"]["server-again"][-3000:]
    run_dir = deployment["run_dir"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["rounds_done"] == 2 and len(metrics["rounds"]) == 2
    assert sorted(s["site"] for s in metrics["sites"]) == list(SITES)
    for rnd in metrics["rounds"]:
        assert all(rnd["sites"][s]["status"] == "ok" for s in SITES)
    from medae_core.bundle import load_bundle

    bundle = load_bundle(run_dir / "model")
    assert bundle.info["round"] == 2 and bundle.threshold is not None
    assert (run_dir / "report.html").stat().st_size > 0
    assert "round 1/1" in deployment["output"]["server"] and "round 2/2" in deployment["output"]["server-again"]
    # The server holds no images: it shows the intensity baseline and says why there is no non-private reference.
    printed = " ".join(deployment["output"]["server-again"].split())
    assert "intensity threshold" in printed and "a deployed server cannot" in printed


def test_a_restarted_server_resumes_the_run_and_privacy_spending_continues(deployment):
    first = deployment["after_first"]
    metrics = json.loads((deployment["run_dir"] / "metrics.json").read_text())
    assert first["rounds_done"] == 1
    assert metrics["run_id"] == first["run_id"]  # the same run, continued
    assert metrics["rounds"][0]["train_loss"] == first["rounds"][0]["train_loss"]
    eps = [r["sites"]["site-a"]["epsilon"] for r in metrics["rounds"]]
    assert eps[1] > eps[0] > 0  # ε is cumulative across the restart
    from medae_core.privacy import PrivacyLedger

    ledger = PrivacyLedger.open(deployment["homes"] / "site-a" / "ledgers" / "site-a.jsonl")
    assert len(ledger.reservations) == 2


def test_the_control_api_is_refused_through_the_public_address(deployment):
    public, loopback = deployment["public"], deployment["loopback"]
    for call in ("start-run", "list-runs", "pull-artifacts"):
        assert public[call] != "served" and "403" in public[call], public
    # The same client on the coordinator's loopback reaches the Control API (so the probe can fail).
    assert loopback["list-runs"] == "served", loopback
    # and only loopback: 0100007F is 127.0.0.1 in /proc/net/tcp (not 00000000, all interfaces)
    assert deployment["superlink_listens_on"] == {"0100007F"}


def test_an_unauthorized_site_is_refused(deployment):
    assert deployment["rogue_rc"] != 0
    assert "refused site rogue" in deployment["output"]["rogue"]
    assert "authorized" in deployment["output"]["rogue"]


def test_a_site_that_does_not_trust_the_ca_fails_clearly(deployment):
    assert deployment["wrong-ca_rc"] != 0
    assert "not trusted" in deployment["output"]["wrong-ca"]


def test_every_process_is_stopped_and_no_data_folder_was_written(deployment):
    assert deployment["server_processes_after_exit"] == []  # medae server stopped its SuperLink itself
    assert deployment["left_running"] == []  # SIGTERM to medae client stopped its SuperNode and ClientApps
    assert _tree(deployment["data"]) == deployment["before"]
