"""`medae server` and `medae client`: a federation across hospitals on Flower's own runtime.

The coordinator runs ``medae server``:

    sites ──TLS──▶ gateway (public HOST:PORT, Fleet API only; `medae.gateway`)
                     │ TLS, loopback
                     ▼
                   flower-superlink (127.0.0.1:PORT+1: Fleet, Control and runtime APIs)
                     │ spawns
                     ▼
                   flwr-serverapp → server.app (writes RUN/)

- The SuperLink runs with TLS, SuperNode authentication and no runtime
  dependency installation. Each ``*.pub`` in ``--authorized-keys`` is
  registered through its Control API (``flwr supernode register``); any other
  key is refused by the SuperLink itself.
- Only processes on the coordinator's machine reach the Control API, because
  the SuperLink listens on loopback and the public gateway forwards nothing
  but Fleet calls. The run is started with ``flwr run`` over loopback, from a
  generated app manifest carrying this run's `RunConfig` (the same manifest
  `medae simulate` uses).
- Progress comes from ``RUN/state.json``, which the ServerApp rewrites after
  every round; the run's status from the Control API.

Each hospital runs ``medae client``: check the data, open (or create) the
site's privacy ledger, check that the server's certificate is signed by the
federation CA, then run ``flower-supernode`` with the data and ledger paths
in its node config. The SuperNode only opens outbound connections. It runs
with process isolation, and ``medae client`` starts its SuperExec itself
(`medae.site_guard`), so every app package the coordinator sends is checked
before anything from it is installed or run: a site runs only its own medae.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from medae_core.config import RunConfig
from medae_core.errors import MedaeError

log = logging.getLogger("medae.deploy")

DEFAULT_PORT = 9092
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
RESTART_DELAY_S = 10.0
CONNECTION = "medae"  # the name of the loopback SuperLink connection in RUN/.flower/config.toml
INSECURE_WARNING = (
    "INSECURE MODE: no TLS and no site authentication. Model updates cross the network in clear text and any "
    "machine that reaches the server can join the federation. Use only for a test on a closed network."
)


class DeployError(MedaeError):
    """A server or site cannot start, or the run failed."""


# -- shared helpers -------------------------------------------------------------
def flower_tool(name: str) -> str:
    """Path of a Flower console script installed next to this Python (``flower-superlink``...)."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    from shutil import which

    found = which(name)
    if not found:
        raise DeployError(f"{name} not found; is flwr installed in this environment?")
    return found


def flower_env(flower_home: Path) -> dict[str, str]:
    """Environment for Flower processes: own home, no telemetry, and this Python's scripts first on PATH.

    Flower starts its helpers (``flower-superexec``, ``flwr-serverapp``,
    ``flwr-clientapp``) by name, so they must resolve to this environment's
    copies even when the virtualenv is not activated.
    """
    env = dict(os.environ)
    scripts = str(Path(sys.executable).parent)
    env.update({
        "PATH": os.pathsep.join([scripts, env.get("PATH", "")]),
        "FLWR_HOME": str(flower_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "PYTHONUNBUFFERED": "1",
    })
    return env


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise DeployError(f"server address {address!r}: expected HOST:PORT, e.g. fl.example.org:{DEFAULT_PORT}")
    return host.strip("[]"), int(port)


class ManagedProcess:
    """A child process in its own process group; output to a log file and a ring buffer."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path,
                 echo: Callable[[str], None] | None = None):
        self.name = name
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.tail: deque[str] = deque(maxlen=200)
        self._log = open(log_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            text=True, errors="replace", start_new_session=True, preexec_fn=_die_with_parent,
        )
        self._echo = echo
        self._reader = threading.Thread(target=self._pump, name=f"{name}-output", daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = ANSI_ESCAPE.sub("", line)  # Flower colours its output; log files stay plain text
            self._log.write(line)
            self._log.flush()
            line = line.rstrip("\n")
            self.tail.append(line)
            if self._echo:
                self._echo(line)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        return "\n".join(self.tail)

    def wait(self, timeout: float | None = None) -> int:
        rc = self.proc.wait(timeout)
        self._reader.join(timeout=5)
        return rc

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop the process and everything it started, in any session.

        Flower starts its helpers (SuperExec, ServerApp, ClientApps) in sessions
        of their own, out of reach of a process-group signal; they are found as
        descendants before the parent goes (after that they are re-parented).
        """
        family = _descendants(self.proc.pid)
        if self.alive():
            _signal_group(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
        _signal_group(self.proc.pid, signal.SIGKILL)  # children that outlived their parent
        if self.alive():
            self.proc.wait(5)
        _stop_pids(family, grace_s=5.0)
        self._reader.join(timeout=5)
        self._log.close()


def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (Linux /proc; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return []
    for entry in entries:
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _stop_pids(pids: list[int], grace_s: float) -> None:
    """SIGTERM, wait up to ``grace_s``, then SIGKILL what is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            if _alive(pid):
                try:
                    os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
        deadline = time.monotonic() + grace_s
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)


def _die_with_parent() -> None:
    """In the child, before exec (Linux): get SIGTERM when medae dies, even by SIGKILL."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# -- server ---------------------------------------------------------------------
@dataclass
class ServerOptions:
    run_dir: Path
    certs: Path | None  # None only with insecure
    authorized_keys: Path | None
    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    internal_port: int | None = None  # default: port + 1
    insecure: bool = False
    start_timeout_s: float = 90.0
    poll_s: float = 2.0

    def superlink_port(self) -> int:
        return self.internal_port or self.port + 1


@dataclass
class ServerFiles:
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    site_keys: dict[str, Path] = field(default_factory=dict)


def check_server_files(opts: ServerOptions) -> ServerFiles:
    files = ServerFiles()
    if opts.insecure:
        return files
    if opts.certs is None:
        raise DeployError("--certs DIR is required (made by `medae certs`), or --insecure for a closed test network")
    names = {"ca": "ca.crt", "cert": "server.crt", "key": "server.key"}
    for attr, name in names.items():
        path = (opts.certs / name).resolve()
        if not path.is_file():
            raise DeployError(f"{opts.certs} has no {name}; make the certificates with `medae certs --out "
                              f"{opts.certs} --server-name HOST`")
        setattr(files, attr, path)
    if opts.authorized_keys is None:
        raise DeployError("--authorized-keys DIR is required: the sites' .pub files (made by `medae keys`); "
                          "a SuperNode whose key is not there is refused")
    if not opts.authorized_keys.is_dir():
        raise DeployError(f"--authorized-keys {opts.authorized_keys} is not a folder")
    files.site_keys = {p.stem: p.resolve() for p in sorted(opts.authorized_keys.glob("*.pub"))}
    if not files.site_keys:
        raise DeployError(f"{opts.authorized_keys} holds no .pub files: no site could join")
    return files


def write_connection(flower_home: Path, address: str, ca: Path | None) -> None:
    """RUN/.flower/config.toml: the loopback connection the coordinator's `flwr` commands use."""
    from medae.simulate import toml_value

    flower_home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f"default = {toml_value(CONNECTION)}", "", f"[superlink.{CONNECTION}]",
             f"address = {toml_value(address)}"]
    lines.append(f"root-certificates = {toml_value(str(ca))}" if ca else "insecure = true")
    (flower_home / "config.toml").write_text("\n".join(lines) + "\n")


def control_client(flower_home: Path):
    """Flower's own Control API client for the loopback connection (coordinator only)."""
    os.environ["FLWR_HOME"] = str(flower_home)
    from flwr.cli.flower_config import read_superlink_connection
    from flwr.cli.utils import init_http_client_from_connection

    with contextlib.redirect_stdout(io.StringIO()):  # it prints "Using SuperLink: ..."
        return init_http_client_from_connection(read_superlink_connection(CONNECTION))


def run_status(client, run_id: int) -> tuple[str, str, str]:
    """(status, sub-status, details) of a run, from the Control API."""
    from flwr.common.serde import run_from_proto
    from flwr.proto.control_pb2 import ListRunsRequest  # pylint: disable=no-name-in-module

    res = client.ListRuns(ListRunsRequest(run_id=run_id))
    run = run_from_proto(res.run_dict[run_id])
    return run.status.status, run.status.sub_status, run.status.details


class Coordinator:
    """One `medae server` invocation: SuperLink + gateway + one run, then shut down."""

    def __init__(self, cfg: RunConfig, opts: ServerOptions, *, progress=None, echo=None):
        self.cfg = cfg
        self.opts = opts
        self.files = check_server_files(opts)
        self.run_dir = opts.run_dir.resolve()
        self.flower_home = self.run_dir / ".flower"
        self.logs = self.run_dir / "logs"
        self.progress = progress  # callable(rounds_done, rounds, last_round_record | None)
        self.echo = echo
        self.superlink: ManagedProcess | None = None
        self.gateway = None
        self.run_id: int | None = None
        self.site_of_node: dict[int, str] = {}
        self.online: set[str] = set()

    @property
    def internal_address(self) -> str:
        return f"127.0.0.1:{self.opts.superlink_port()}"

    # -- lifecycle ------------------------------------------------------------------
    def __enter__(self) -> Coordinator:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.gateway is not None:
            self.gateway.stop()
            self.gateway = None
        if self.superlink is not None:
            self.superlink.stop()
            self.superlink = None

    def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_connection(self.flower_home, self.internal_address, self.files.ca)
        self.start_superlink()
        self.register_sites()
        self.start_gateway()

    def start_superlink(self) -> None:
        argv = [flower_tool("flower-superlink"), "--host", "127.0.0.1", "--port", str(self.opts.superlink_port()),
                "--isolation", "subprocess", "--disable-runtime-dependency-installation"]
        if self.opts.insecure:
            argv.append("--insecure")
        else:
            argv += ["--ssl-certfile", str(self.files.cert), "--ssl-keyfile", str(self.files.key),
                     "--ssl-ca-certfile", str(self.files.ca), "--enable-supernode-auth"]
        log.info("starting the SuperLink on %s (loopback only)", self.internal_address)
        self.superlink = ManagedProcess("superlink", argv, flower_env(self.flower_home),
                                        self.logs / "superlink.log", echo=self.echo)
        self._wait_healthy()

    def _wait_healthy(self) -> None:
        import httpx

        scheme = "http" if self.opts.insecure else "https"
        verify = True if self.opts.insecure else ssl.create_default_context(cafile=str(self.files.ca))
        deadline = time.monotonic() + self.opts.start_timeout_s
        while time.monotonic() < deadline:
            if not self.superlink.alive():
                raise DeployError(f"the SuperLink stopped while starting:\n{self.superlink.output()[-3000:]}")
            try:
                if httpx.get(f"{scheme}://{self.internal_address}/health", verify=verify, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise DeployError(f"the SuperLink did not answer within {self.opts.start_timeout_s:.0f} s "
                          f"(log: {self.superlink.log_path})")

    def flwr(self, *args: str, timeout: float = 120.0) -> dict:
        """Run a `flwr` CLI command against the loopback SuperLink; its JSON answer."""
        argv = [flower_tool("flwr"), *args, "--format", "json"]
        done = subprocess.run(argv, env=flower_env(self.flower_home), capture_output=True, text=True,
                              timeout=timeout, cwd=self.run_dir)
        text = done.stdout.strip()
        try:
            answer = json.loads(text[text.index("{"):]) if "{" in text else {}
        except ValueError:
            answer = {}
        if done.returncode != 0 or not answer.get("success", False):
            detail = answer.get("error-message") or (done.stderr.strip() or text)[-2000:]
            raise DeployError(f"`flwr {' '.join(args[:2])}` failed: {detail}")
        return answer

    def register_sites(self) -> None:
        for site, pub in self.files.site_keys.items():
            try:
                answer = self.flwr("supernode", "register", str(pub), CONNECTION, "--name", site)
            except DeployError as exc:
                raise DeployError(f"cannot authorize site {site} ({pub.name}): {exc}") from None
            self.site_of_node[int(answer["node-id"])] = site
            log.info("authorized site %s", site)

    def start_gateway(self) -> None:
        from medae.gateway import Gateway, GatewayConfig, body_limit
        from medae_core.models import build_model

        scheme = "http" if self.opts.insecure else "https"
        parameters = sum(t.numel() for t in build_model(self.cfg.model).state_dict().values())
        self.gateway = Gateway(GatewayConfig(
            host=self.opts.host, port=self.opts.port, upstream=f"{scheme}://{self.internal_address}",
            certfile=self.files.cert, keyfile=self.files.key, ca_certfile=self.files.ca,
            max_body_bytes=body_limit(parameters),  # the largest message this run's model needs
        ))
        self.gateway.start()
        log.info("sites connect to %s:%d (%s)", self.opts.host, self.opts.port,
                 "NO TLS" if self.opts.insecure else "TLS, authorized site keys only")

    # -- the run --------------------------------------------------------------------
    def launch(self) -> int:
        from medae.simulate import write_app

        extra = {}
        if self.site_of_node:  # who is who comes from the registered keys, not from the sites' replies
            from medae_core.federated import SITE_REGISTRY, SITE_REGISTRY_KEY, write_site_registry

            write_site_registry(self.run_dir / SITE_REGISTRY, self.site_of_node)
            extra[SITE_REGISTRY_KEY] = str(self.run_dir / SITE_REGISTRY)
        app_dir = write_app(self.cfg, self.run_dir, extra)
        answer = self.flwr("run", str(app_dir), CONNECTION)
        self.run_id = int(answer["run-id"])
        log.info("run %s started on the SuperLink", self.run_id)
        return self.run_id

    def wait(self) -> dict:
        """Follow the run to its end; the final metrics."""
        client = control_client(self.flower_home)
        rounds = self.cfg.federation.rounds
        seen = -1
        status = ("", "", "")
        while True:
            if not self.superlink.alive():
                raise DeployError(f"the SuperLink stopped during the run (log: {self.superlink.log_path})")
            state = self._state()
            if state and state.get("rounds_done", 0) != seen:
                seen = state.get("rounds_done", 0)
                if self.progress:
                    self.progress(seen, rounds, (state.get("rounds") or [None])[-1])
            self._report_sites(client)
            status = run_status(client, self.run_id)
            if status[0] == "finished":
                break
            time.sleep(self.opts.poll_s)
        if status[1] != "completed":
            raise DeployError(f"run {self.run_id} {status[1] or 'failed'}: {status[2] or 'no details'} "
                              f"(logs: {self.logs}; `flwr log {self.run_id}` with FLWR_HOME={self.flower_home})")
        metrics_path = self.run_dir / "metrics.json"
        if not metrics_path.exists():
            raise DeployError(f"run {self.run_id} finished without writing {metrics_path}")
        return json.loads(metrics_path.read_text())

    def _report_sites(self, client) -> None:
        """Log authorized sites as they come online and go offline (from the Control API)."""
        from flwr.proto.control_pb2 import ListNodesRequest  # pylint: disable=no-name-in-module

        try:
            nodes = client.ListNodes(ListNodesRequest()).nodes_info
        except Exception:  # noqa: BLE001 - a view only; the run goes on
            return
        online = {self.site_of_node[n.node_id] for n in nodes
                  if n.status == "online" and n.node_id in self.site_of_node}
        for site in sorted(online - self.online):
            log.info("site %s is online (%d of %d authorized sites)", site, len(online), len(self.site_of_node))
        for site in sorted(self.online - online):
            log.warning("site %s went offline", site)
        self.online = online

    def _state(self) -> dict | None:
        try:
            return json.loads((self.run_dir / "state.json").read_text())
        except (OSError, ValueError):
            return None


def serve(cfg: RunConfig, opts: ServerOptions, *, progress=None, echo=None) -> dict:
    """Start everything, run the federation to its end (the ServerApp writes RUN/), stop everything; the metrics."""
    with Coordinator(cfg, opts, progress=progress, echo=echo) as coordinator:
        coordinator.start()
        coordinator.launch()
        return coordinator.wait()


# -- client ---------------------------------------------------------------------
@dataclass
class ClientOptions:
    server: str
    data: Path
    ca: Path | None
    key: Path | None
    site_name: str | None = None
    ledger: Path | None = None
    insecure: bool = False
    allow_no_dp: bool = False
    runtime_port: int | None = None  # the SuperNode's local runtime API (loopback); default: a free port
    max_wait_s: float | None = None  # one SuperNode gives up after this long without the server
    once: bool = False  # stop when the SuperNode stops, instead of starting a new one
    approved_fabs: Path | None = None  # a file of app package hashes this site approved (None: any code-free one)


def site_name_of(opts: ClientOptions) -> str:
    from medae.pki import SITE_NAME

    name = opts.site_name or (opts.key.stem if opts.key else None)
    if not name:
        raise DeployError("--site-name is required without --key (the name the coordinator sees)")
    if not SITE_NAME.match(name):
        raise DeployError(f"site name {name!r}: use letters, digits, '.', '_' or '-'")
    return name


def check_server_certificate(server: str, ca: Path, timeout_s: float = 10.0) -> bool:
    """True when the server's TLS certificate is signed by ``ca`` and names the host; False when unreachable.

    Raises DeployError (with what to do) when the certificate is not trusted.
    """
    host, port = split_address(server)
    context = ssl.create_default_context(cafile=str(ca))
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            with context.wrap_socket(sock, server_hostname=host):
                return True
    except ssl.SSLCertVerificationError as exc:
        raise DeployError(
            f"the server at {server} is not trusted: its certificate {exc.verify_message} with the CA "
            f"{ca}. Check that --ca is the federation's ca.crt from the coordinator and that the server "
            f"certificate was made for the name {host!r} (`medae certs --server-name {host}`). Not connecting."
        ) from None
    except ssl.SSLError as exc:
        raise DeployError(f"TLS with the server at {server} failed ({exc.reason}); is it a medae server "
                          "started with --certs (not --insecure)?") from None
    except OSError as exc:
        log.warning("the server at %s is not reachable yet (%s); the site will keep trying", server, exc)
        return False


def prepare_site(cfg: RunConfig, opts: ClientOptions) -> tuple[str, Path, dict]:
    """Check the data and open (or create) the ledger before joining: (site, ledger path, data report)."""

    from medae_core.data import check_data
    from medae_core.privacy import PrivacyLedger, check_ledger_location, default_ledger_path

    site = site_name_of(opts)
    if not opts.data.is_dir():
        raise DeployError(f"--data {opts.data} is not a folder")
    report = check_data(opts.data, cfg.data, cfg.model.image_size)
    train = report["parts"]["train"]["usable_images"]
    if train < 1:
        raise DeployError(
            f"no usable training image in {opts.data} ({len(report['skipped'])} files skipped); this site cannot "
            "train, so it does not join. Run `medae check-data` on the folder for every reason."
        )
    ledger_path = (opts.ledger or default_ledger_path(site)).expanduser().resolve()
    check_ledger_location(ledger_path, opts.data)
    if cfg.privacy.enabled:
        PrivacyLedger.for_config(cfg.privacy, site=site, path=ledger_path)
    return site, ledger_path, report


def node_config(site: str, data: Path, ledger: Path, allow_no_dp: bool, privacy_unit: str = "patient",
                device: str = "auto") -> str:
    """The SuperNode's ``--node-config`` string: the site's paths, name and privacy policy.

    Paths never leave the site. ``allow-no-dp`` and ``privacy-unit`` are the
    site's own policy, which the ClientApp enforces against the server's run;
    ``device`` (auto, cpu, cuda, cuda:N) is the site's hardware choice.
    """
    pairs = {
        "data-path": str(data.resolve()),
        "ledger-path": str(ledger),
        "site-name": site,
        "allow-no-dp": allow_no_dp,
        "privacy-unit": privacy_unit,
        "device": device,
    }
    return " ".join(f"{k}={_node_value(v)}" for k, v in pairs.items())


def _node_value(value: str | bool) -> str:
    """A TOML value that Flower's ``--node-config`` parser (one quoted string, no escaped quotes) reads back."""
    from medae.simulate import toml_value

    if isinstance(value, bool):
        return toml_value(value)
    if "\n" in value or ('"' in value and "'" in value):
        raise DeployError(f"{value!r}: Flower's --node-config cannot carry a path with a line break or with both "
                          "kinds of quote; use another folder name (or a symlink)")
    return f"'{value}'" if '"' in value else toml_value(value)  # a TOML literal string keeps " as it is


# What the SuperNode prints when the SuperLink refuses its key, and when TLS fails.
_REFUSED = ("Failed to activate SuperNode", "Invalid SuperNode authentication", "status code 401")
_TLS = ("CERTIFICATE_VERIFY_FAILED", "SSL/TLS handshake error")


def supernode_argv(opts: ClientOptions, site: str, ledger: Path, flower_home: Path, cfg: RunConfig,
                   runtime_port: int | None = None) -> list[str]:
    """The SuperNode: process isolation, so that its ClientApps are the ones `superexec_argv` starts."""
    node = node_config(site, opts.data, ledger, opts.allow_no_dp, cfg.privacy.unit, cfg.train.device)
    argv = [flower_tool("flower-supernode"), "--superlink", opts.server, "--node-config", node,
            "--isolation", "process", "--port", str(runtime_port or opts.runtime_port or free_port())]
    if opts.insecure:
        argv.append("--insecure")
    else:
        argv += ["--root-certificates", str(opts.ca.resolve()), "--auth-supernode-private-key", str(opts.key.resolve())]
    if opts.max_wait_s:
        argv += ["--max-wait-time", str(opts.max_wait_s)]
    return argv


def superexec_argv(runtime_port: int, supernode_pid: int) -> list[str]:
    """medae's SuperExec for the SuperNode on ``runtime_port``: it checks every app package first (`medae.site_guard`).

    The SuperNode's runtime API is on loopback; like Flower's own subprocess mode,
    the SuperExec talks to it without TLS.
    """
    return [sys.executable, "-m", "medae.site_guard", "--runtime-api-address", f"127.0.0.1:{runtime_port}",
            "--insecure", "--parent-pid", str(supernode_pid)]


def check_client_files(opts: ClientOptions) -> None:
    if opts.insecure:
        return
    for flag, path in (("--ca", opts.ca), ("--key", opts.key)):
        if path is None:
            raise DeployError(f"{flag} is required (or --insecure for a closed test network)")
        if not path.is_file():
            raise DeployError(f"{flag} {path} does not exist")
    if opts.key.stat().st_mode & 0o077:
        log.warning("%s is readable by other users; `chmod 600 %s`", opts.key, opts.key)


def join(cfg: RunConfig, opts: ClientOptions, *, home: Path, echo=None, on_start=None) -> int:
    """Run this site's SuperNode; start it again whenever it stops, unless ``opts.once``.

    A SuperNode ends when it loses its server (a restart, a network cut); the
    site stays available by starting a new one after `RESTART_DELAY_S`. A
    refused key or an untrusted server certificate ends `join` with an error:
    retrying cannot fix either.
    """
    check_client_files(opts)
    site, ledger, report = prepare_site(cfg, opts)
    if on_start:
        on_start(site, ledger, report)
    flower_home = home / "flower" / site
    flower_home.mkdir(parents=True, exist_ok=True)
    while True:
        if not opts.insecure:
            check_server_certificate(opts.server, opts.ca)
        rc, node = _run_supernode(opts, site, ledger, flower_home, home, echo, cfg)
        text = node.output()
        if any(marker in text for marker in _REFUSED):
            raise DeployError(
                f"the server refused site {site}: its key is not authorized there. Send "
                f"{opts.key.with_suffix('.pub')} to the coordinator, who adds it to the server's --authorized-keys "
                "folder and restarts the server."
            )
        if any(marker in text for marker in _TLS):
            raise DeployError(f"TLS with {opts.server} failed: the server's certificate is not trusted with "
                              f"--ca {opts.ca}")
        if opts.once:
            if rc != 0:
                raise DeployError(f"the SuperNode stopped (exit code {rc}); log: {node.log_path}")
            return 0
        log.warning("the SuperNode stopped (exit code %s: the server is gone or restarting); starting it again in "
                    "%.0f s. Ctrl-C to leave the federation.", rc, RESTART_DELAY_S)
        time.sleep(RESTART_DELAY_S)


def _run_supernode(opts, site, ledger, flower_home, home, echo, cfg) -> tuple[int, ManagedProcess]:
    port = opts.runtime_port or free_port()
    env = flower_env(flower_home)
    if opts.approved_fabs:
        from medae.site_guard import APPROVED_FABS_ENV

        env[APPROVED_FABS_ENV] = str(Path(opts.approved_fabs).resolve())
    node = ManagedProcess("supernode", supernode_argv(opts, site, ledger, flower_home, cfg, port), env,
                          home / "logs" / f"{site}-supernode.log", echo=echo)
    superexec = None
    try:
        superexec = ManagedProcess("superexec", superexec_argv(port, node.proc.pid), env,
                                   home / "logs" / f"{site}-superexec.log", echo=echo)
        rc = node.wait()
    finally:  # after Ctrl-C too: never leave a SuperNode, its SuperExec or their ClientApps behind
        if superexec is not None:
            superexec.stop()
        node.stop()
    return rc, node
