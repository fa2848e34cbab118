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

Layout: `medae.deploy.common` (ports, Flower's tools, child processes),
`medae.deploy.coordinator` (``medae server``), `medae.deploy.join` (``medae client``).
"""

from medae.deploy.common import (
    CONNECTION,
    DEFAULT_PORT,
    INSECURE_WARNING,
    RESTART_DELAY_S,
    DeployError,
    ManagedProcess,
    flower_env,
    flower_tool,
    free_port,
    split_address,
)
from medae.deploy.coordinator import Coordinator, ServerOptions, check_server_files, serve, write_connection
from medae.deploy.join import (
    ClientOptions,
    check_server_certificate,
    join,
    node_config,
    prepare_site,
    superexec_argv,
    supernode_argv,
)

__all__ = [
    "CONNECTION", "DEFAULT_PORT", "INSECURE_WARNING", "RESTART_DELAY_S", "ClientOptions", "Coordinator",
    "DeployError", "ManagedProcess", "ServerOptions", "check_server_certificate", "check_server_files",
    "flower_env", "flower_tool", "free_port", "join", "node_config", "prepare_site", "serve", "split_address",
    "superexec_argv", "supernode_argv", "write_connection",
]
