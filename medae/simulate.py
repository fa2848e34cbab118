"""`medae simulate`: a whole federation on one machine.

Runs the same ServerApp (`server.app`) and ClientApp (`client.app`) that a
deployment runs, on Flower's Simulation Runtime with the Ray backend: K
virtual SuperNodes, node k reading site folder k of the federation root.

Both apps receive exactly the `RunConfig` the command line built, through
the app manifest in the run folder (`medae.app_manifest`), as a deployment's do.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from medae.app_manifest import run_config, write_app
from medae_core.config import RunConfig
from medae_core.contract import RUN_EXPECTED_SITES, RUN_SITE_SNAPSHOTS
from medae_core.data import site_folders
from medae_core.errors import ConfigError, DataError
from medae_core.fileio import ensure_outside

log = logging.getLogger(__name__)


def run_simulation(cfg: RunConfig, run_dir: Path, client_app=None, after=None) -> Path:
    """Run the federation described by ``cfg``; return the run folder.

    ``client_app``: what every node runs; medae's own ClientApp (``client.app``)
    unless a test passes another (e.g. a hostile site's). ``after(snapshots)``: called
    once the federation is done, while its folder of site reads (or None) still exists.
    """
    # Flower and Ray are imported in `_simulate`, so that the rest of the CLI starts fast.
    if client_app is None:
        from client.app import app as client_app

    root = Path(cfg.federation.data_root)
    sites = site_folders(root)
    if len(sites) < cfg.federation.sites:
        raise ConfigError(f"{root} has {len(sites)} site folders but {cfg.federation.sites} sites were asked for")
    if cfg.federation.min_sites > cfg.federation.sites:
        raise ConfigError("federation.min_sites cannot exceed federation.sites")
    preflight(cfg)

    # Round 1 waits for every virtual site: Flower registers them while the ServerApp already runs.
    # Each site is read once for the run, whichever Ray actor gets its messages (a private temporary
    # folder, hidden and outside the data: `medae_core.site.load_site_data`).
    extra = {RUN_EXPECTED_SITES: cfg.federation.sites}
    snapshots = None
    try:  # checked before the folder is made: with $TMPDIR in the data, nothing is made there
        ensure_outside(Path(tempfile.gettempdir()), root)
        snapshots = Path(tempfile.mkdtemp(prefix=".medae-sites-"))
        extra[RUN_SITE_SNAPSHOTS] = str(snapshots)
    except DataError:
        log.info("each site is read by every Ray actor: the temporary folder would be inside %s", root)
    try:
        _simulate(cfg, run_dir, client_app, extra)
        if after is not None:
            after(snapshots)
    finally:
        if snapshots is not None:
            shutil.rmtree(snapshots, ignore_errors=True)
    return run_dir


def _simulate(cfg: RunConfig, run_dir: Path, client_app, extra: dict) -> None:
    from flwr.app import Context, RecordDict
    from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES
    from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity

    from medae import sim_poller
    from server.app import app as server_app

    app_dir = write_app(cfg, run_dir, extra)
    flat = run_config(cfg, run_dir) | extra

    run_id = generate_rand_int_from_bytes(RUN_ID_NUM_BYTES)
    # The same Run set-up as flwr.simulation.run_simulation, plus our run_config.
    run = Run.create_empty(run_id=run_id)
    run.override_config = flat
    run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    run.federation_id = NOOP_FEDERATION_ID
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SUPERLINK_NODE_ID
    context = Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config=dict(flat))
    backend_config = {
        "client_resources": {"num_cpus": cfg.federation.client_cpus, "num_gpus": cfg.federation.client_gpus},
        "init_args": {"include_dashboard": False, "num_cpus": os.cpu_count() or 1},
    }
    # Sites are offline: the app is installed beforehand, nothing is installed at run time.
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # and silence Ray's notice about it
    sim_poller.install()  # Flower's poller is quadratic in sites (medae.sim_poller)
    _run_simulation(
        num_supernodes=cfg.federation.sites,
        client_app=client_app,
        server_app=server_app,
        backend_name="ray",
        backend_config=backend_config,
        app_dir=str(app_dir),
        run=run,
        server_app_context=context,
        is_app=True,  # nodes read their run_config from the manifest in app_dir
        exit_event=_exit_event(),
    )


def preflight(cfg: RunConfig) -> None:
    """Fail before Ray starts on what would otherwise fail in every node, every round.

    The device must exist on this machine, and the starting model must load and
    fit the configured architecture.
    """
    from medae_core.devices import resolve_device
    from medae_core.pretrain import ensure_start
    from medae_core.starts import initial_weights
    from medae_core.tracking import check_tracking

    resolve_device(cfg.train.device)
    check_tracking(cfg)
    ensure_start(cfg)  # a public model that does not ship is built here, not in every node
    initial_weights(cfg)


def _exit_event():
    from flwr.supercore.telemetry import EventType

    return EventType.PYTHON_API_RUN_SIMULATION_LEAVE


def prepare_and_run(cfg: RunConfig, run_dir: Path, *, baselines: bool = False) -> dict:
    """Data (the built-in benchmark unless a root is given), simulation, baselines, report.

    ``baselines``: every baseline row (`medae_core.baselines`); otherwise, with
    ``federation.reference``, the non-private reference and the intensity threshold.
    """
    import json

    from medae_core.benchmark import CONTRASTS, make_benchmark

    run_dir = Path(run_dir)
    if not cfg.federation.data_root:
        root = run_dir / "data"
        contrasts = cfg.data.contrasts or ("t1",)  # the contrasts the run reads (a CVAE: its labels)
        if set(contrasts) - set(CONTRASTS):
            raise ConfigError(f"the built-in benchmark has the contrasts {', '.join(CONTRASTS)}; this run reads "
                              f"{', '.join(contrasts)}: give --data a federation of your own")
        if not (root / "benchmark.json").exists():
            log.info("writing the built-in benchmark (%d sites, %s) to %s", cfg.federation.sites,
                     ", ".join(contrasts), root)
            make_benchmark(root, sites=cfg.federation.sites, patients=cfg.federation.benchmark_patients,
                           test_patients=cfg.federation.benchmark_test_patients or None,
                           seed=cfg.federation.benchmark_seed, contrasts=contrasts)
        written = json.loads((root / "benchmark.json").read_text())["parameters"].get("contrasts", "t1")
        if written != ",".join(contrasts):
            raise ConfigError(f"{root} holds a benchmark of {written}, but this run reads {', '.join(contrasts)}: "
                              "use a new --out")
        cfg = cfg.with_overrides({"federation.data_root": str(root.resolve())})
    def after(snapshots: Path | None) -> None:
        from medae_core.baselines import add_baselines

        add_baselines(run_dir, cfg, full=baselines, snapshots=snapshots)

    run_simulation(cfg, run_dir, after=after if baselines or cfg.federation.reference else None)
    return json.loads((run_dir / "metrics.json").read_text())
