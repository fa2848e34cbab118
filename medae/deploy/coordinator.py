"""`medae server`: the loopback SuperLink, the public Fleet-only gateway, the site registry and one run."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import ssl
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from medae.deploy.common import (
    CONNECTION,
    DEFAULT_PORT,
    DeployError,
    ManagedProcess,
    flower_env,
    flower_tool,
)
from medae_core.config import RunConfig

log = logging.getLogger("medae.deploy")


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
    from medae.app_manifest import toml_value

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
        from medae.app_manifest import write_app

        extra = {}
        if self.site_of_node:  # who is who comes from the registered keys, not from the sites' replies
            from medae_core.contract import RUN_SITE_REGISTRY
            from medae_core.federated import SITE_REGISTRY, write_site_registry

            write_site_registry(self.run_dir / SITE_REGISTRY, self.site_of_node)
            extra[RUN_SITE_REGISTRY] = str(self.run_dir / SITE_REGISTRY)
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
    from medae_core.pretrain import ensure_start
    from medae_core.tracking import check_tracking

    check_tracking(cfg)
    with Coordinator(cfg, opts, progress=progress, echo=echo) as coordinator:
        coordinator.start()
        # A public model that does not ship is built now, while sites connect, before the ServerApp needs it.
        ensure_start(cfg)
        coordinator.launch()
        return coordinator.wait()
