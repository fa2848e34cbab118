"""The medae ClientApp: one per hospital, the same in simulation and deployment.

Thin by design: unpack the message, call `medae_core.site`, pack the reply.
What may leave the site is fixed here, in one place:
- ``arrays``: the model's state dict (no Opacus wrapper);
- ``metrics``: the scalars and histogram counts named in `contract.TRAIN_METRICS` /
  `contract.EVAL_METRICS`, nothing else;
- ``site``: the site's display name and privacy unit.
Refusals (budget spent, no usable data, ledger problem) are error replies
whose reason is built here from numbers and the site name: never from paths,
file names, or exception text that could carry them. Full details go to the
site's own log.

Where the site's data and ledger are:
- deployment (``medae client``): node config ``data-path``, ``ledger-path``
  and ``site-name`` (`medae_core.contract`);
- simulation (``medae simulate``): site folder k (`medae_core.data.site_folders`) of the run
  config's ``federation.data_root`` for node partition k, ledger in the run folder.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from medae_core import contract as c
from medae_core.config import RunConfig
from medae_core.contract import (
    BUDGET_EXCEEDED,
    EVAL_METRICS,
    LEDGER_PROBLEM,
    NO_USABLE_DATA,
    SITE_FAILURE,
    SITE_POLICY,
    TRAIN_METRICS,
)
from medae_core.data import site_folders
from medae_core.errors import BudgetExceededError, DataError, LedgerError, PrivacyError, SitePolicyError
from medae_core.federated import write_site_progress
from medae_core.privacy import PrivacyLedger, check_ledger_location, default_ledger_path
from medae_core.scoring import score_histogram
from medae_core.site import SiteTrainer, load_site_data

log = logging.getLogger("medae.client")

# A deployed site reads its folder in every message; a read this slow gets a hint about the image cache.
SLOW_READ_HINT_SECONDS = 10.0
app = ClientApp()


class _NoActorTeardownNotice(logging.Filter):
    """Flower's simulation actors log "Manually terminating ClientAppActor" as a WARNING at every normal end."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Manually terminating" not in record.getMessage()


# On the logger itself, so that none of its handlers (nor the root's, in a Ray actor) print it.
if not any(isinstance(f, _NoActorTeardownNotice) for f in logging.getLogger("flwr").filters):
    logging.getLogger("flwr").addFilter(_NoActorTeardownNotice())

PROGRESS_INTERVAL_S = 0.5


# -- where things are ---------------------------------------------------------
def site_location(context: Context, cfg: RunConfig) -> tuple[str, Path, Path]:
    """(site name, data folder, ledger path) for this node."""
    node = context.node_config
    if c.NODE_DATA_PATH in node:
        data = Path(str(node[c.NODE_DATA_PATH]))
        name = str(node.get(c.NODE_SITE_NAME, "site"))
        ledger = Path(str(node[c.NODE_LEDGER_PATH])) if node.get(c.NODE_LEDGER_PATH) else default_ledger_path(name)
        return name, data, ledger
    root = Path(cfg.federation.data_root)
    sites = site_folders(root)  # the same rule `medae simulate` counts sites with
    partition = int(node[c.PARTITION_ID])
    if partition >= len(sites):
        raise DataError(f"simulation node {partition} has no site folder: {root} holds {len(sites)}")
    data = sites[partition]
    run_dir = Path(str(context.run_config[c.RUN_DIR]))
    return data.name, data, run_dir / "ledgers" / f"{data.name}.jsonl"


def check_site_policy(cfg: RunConfig, node: dict) -> None:
    """A deployed site's own privacy policy (node config from `medae client`) against the server's run config.

    The run config comes from the server; whether DP may be off, and what one
    unit of privacy is, are the site's decisions. (Budget, δ and accountant are
    pinned by the site's ledger.)
    """
    if cfg.privacy.reproducible_noise:
        raise SitePolicyError("the run asks for reproducible DP noise (privacy.reproducible_noise), which the "
                              "coordinator could subtract; a deployed site never trains with it")
    if not cfg.privacy.enabled:
        if not node.get(c.NODE_ALLOW_NO_DP, False):
            raise SitePolicyError("this site trains only with differential privacy, and the run has it switched off")
        return
    unit = str(node.get(c.NODE_PRIVACY_UNIT, "patient"))
    if cfg.privacy.unit != unit:
        raise SitePolicyError(f"this site accounts privacy per {unit}; the run asks for per-{cfg.privacy.unit} "
                              "accounting")


def open_site(context: Context, *, for_training: bool) -> tuple[str, SiteTrainer, RunConfig]:
    """The site's trainer; its privacy ledger is opened only when it is about to train."""
    cfg = RunConfig.from_flat(context.run_config)
    name, data_path, ledger_path = site_location(context, cfg)
    if c.NODE_DATA_PATH in context.node_config and for_training:
        check_site_policy(cfg, context.node_config)
    if context.node_config.get(c.NODE_DEVICE):  # the site's hardware is the site's choice (`medae client --device`)
        cfg = replace(cfg, train=replace(cfg.train, device=str(context.node_config[c.NODE_DEVICE])))
    if c.NODE_DATA_PATH in context.node_config:  # so is keeping copies of its pixels (`medae client --image-cache`)
        cfg = replace(cfg, data=replace(cfg.data, cache=bool(context.node_config.get(c.NODE_IMAGE_CACHE, False))))
    ledger = None
    if cfg.privacy.enabled and for_training:
        check_ledger_location(ledger_path, data_path)
        ledger = PrivacyLedger.for_config(cfg.privacy, site=name, path=ledger_path)
    # Simulated sites share one read of each site between Ray actors; a deployed site reads its own folder,
    # in a process of its own for each message, so a train message leaves test/ unread.
    deployed = c.NODE_DATA_PATH in context.node_config
    snapshots = None if deployed else context.run_config.get(c.RUN_SITE_SNAPSHOTS)
    started = time.perf_counter()
    data = load_site_data(data_path, cfg, name=name, snapshots=str(snapshots) if snapshots else None,
                          with_test=not (deployed and for_training))
    read_s = time.perf_counter() - started
    if c.NODE_DATA_PATH in context.node_config and not cfg.data.cache and read_s >= SLOW_READ_HINT_SECONDS:
        log.info("site %s: reading its images took %.0f s, again in every message (Flower starts a process for "
                 "each). `medae client --image-cache` keeps them decoded between messages, several times faster "
                 "to read: a second copy of the pixels, owner-only, outside the data folder (`medae cache`)",
                 name, read_s)
    # A deployed site warns in its own log; simulated sites leave it to the ServerApp's one line for all.
    return name, SiteTrainer(data, cfg, ledger, warn_noise=c.NODE_DATA_PATH in context.node_config), cfg


# -- message handlers ---------------------------------------------------------
@app.train()
def train(msg: Message, context: Context) -> Message:
    return _guarded(msg, context, _train)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _guarded(msg, context, _evaluate)


def _train(msg: Message, context: Context) -> Message:
    name, trainer, cfg = open_site(context, for_training=True)
    config = msg.content["config"]
    server_round = int(config[c.ROUND])
    result = trainer.train_round(
        msg.content["arrays"].to_torch_state_dict(),
        run_id=str(config.get(c.ROUND_RUN_ID, "")),
        server_round=server_round,
        rounds_left=int(config.get(c.ROUND_ROUNDS_LEFT, 1)),
        proximal_mu=float(config.get(c.ROUND_PROXIMAL_MU, 0.0)),
        progress=_simulation_progress(context, name, server_round),
    )
    metrics = {
        "num-examples": result.num_examples,
        "loss": result.loss,
        "steps": result.steps,
        "epsilon": result.epsilon,
        "delta": result.delta,
        "budget-epsilon": cfg.privacy.budget_epsilon if cfg.privacy.enabled else 0.0,
        "noise-multiplier": result.noise_multiplier or 0.0,
        "sample-rate": result.sample_rate,
        "seconds": result.seconds,
        "images-per-second": result.images_per_second,
        "trained-parameters": result.trained_parameters,
        "noise-to-signal": result.noise_to_signal or 0.0,
    }
    log.info("site %s round %d: loss %.4f, epsilon %.2f", name, server_round, result.loss, result.epsilon)
    return _reply(msg, name, cfg, metrics, TRAIN_METRICS, arrays=ArrayRecord(result.state_dict))


def _evaluate(msg: Message, context: Context) -> Message:
    name, trainer, cfg = open_site(context, for_training=False)
    config = msg.content["config"]
    threshold = float(config[c.ROUND_THRESHOLD]) if c.ROUND_THRESHOLD in config else None
    part = str(config.get(c.ROUND_EVALUATE, ""))
    if part not in ("", c.EVALUATE_VALIDATION, c.EVALUATE_TEST):
        raise ValueError(f"unknown evaluation part {part!r}")
    with_val, with_test = part != c.EVALUATE_TEST, part != c.EVALUATE_VALIDATION
    result = trainer.evaluate(msg.content["arrays"].to_torch_state_dict(), threshold,
                              with_test=with_test, with_val=with_val)
    metrics: dict = {"num-examples": result.num_val}
    if with_val:
        metrics["val-loss"] = result.val_loss
        metrics[c.histogram_key("healthy")] = _counts(score_histogram(result.healthy_scores))
    for histogram, counts in result.test_histograms.items():
        metrics[c.histogram_key(histogram)] = _counts(counts)
    for metric in c.EXACT_METRICS:
        value = result.test.get(metric)
        if value is not None and np.isfinite(value):
            metrics[c.wire(metric)] = float(value)
    return _reply(msg, name, cfg, metrics, EVAL_METRICS)


def _simulation_progress(context: Context, site: str, server_round: int):
    """In simulation, steps within the round go to RUN/progress/ for `medae simulate`'s display.

    A deployed site writes nothing of the kind: the run folder is the coordinator's.
    """
    if c.PARTITION_ID not in context.node_config or c.RUN_DIR not in context.run_config:
        return None
    run_dir = Path(str(context.run_config[c.RUN_DIR]))
    last = [0.0]

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if done == total or now - last[0] >= PROGRESS_INTERVAL_S:
            last[0] = now
            write_site_progress(run_dir, site, server_round, done, total)

    return progress


# -- replies --------------------------------------------------------------------
def _counts(counts: np.ndarray) -> list[int]:
    return [int(c) for c in counts]


def _reply(msg, name, cfg, metrics, allowed, arrays=None) -> Message:
    unknown = set(metrics) - set(allowed)
    if unknown:  # a programming error, caught before anything leaves the site
        raise AssertionError(f"metrics not on the whitelist: {sorted(unknown)}")
    content = RecordDict(
        {
            "metrics": MetricRecord(metrics),
            "site": ConfigRecord({c.SITE_NAME: name, c.SITE_UNIT: cfg.privacy.unit}),
        }
    )
    if arrays is not None:
        content["arrays"] = arrays
    return Message(content, reply_to=msg)


def site_name(context: Context) -> str:
    """The name a refusal is reported under (never derived from a path in deployment)."""
    node = context.node_config
    if c.NODE_SITE_NAME in node:
        return str(node[c.NODE_SITE_NAME])
    try:
        return site_location(context, RunConfig.from_flat(context.run_config))[0]
    except Exception:  # noqa: BLE001 - a name for the error message only
        return f"partition-{node.get(c.PARTITION_ID, '?')}"


def _guarded(msg: Message, context: Context, handler) -> Message:
    """Run a handler; turn every failure into a reason that carries no path.

    Reasons name the site (`contract.refusal`): an error reply has no content, so
    this is how the server knows which site refused.
    """
    site = site_name(context)

    def refuse(code: int, reason: str) -> Message:
        return Message(Error(code, c.refusal(site, reason)), reply_to=msg)

    try:
        return handler(msg, context)
    except BudgetExceededError as exc:
        log.warning("site %s refuses the round: %s", site, exc)
        return refuse(BUDGET_EXCEEDED, f"refused: {exc}")
    except SitePolicyError as exc:
        log.warning("site %s refuses the round: %s", site, exc)
        return refuse(SITE_POLICY, f"refused: {exc}")
    except LedgerError:
        log.exception("site %s: privacy ledger problem", site)
        return refuse(LEDGER_PROBLEM, "cannot train: privacy ledger missing or corrupted; an administrator "
                                      "must check it (details in the site's log)")
    except PrivacyError:
        log.exception("site %s: privacy settings problem", site)
        return refuse(LEDGER_PROBLEM, "cannot train: the run's privacy settings conflict with the site's "
                                      "ledger (details in the site's log)")
    except DataError:
        log.exception("site %s: data problem", site)
        return refuse(NO_USABLE_DATA, "cannot train: no usable training data (run `medae check-data` on the "
                                      "site's folder for details)")
    except Exception as exc:  # noqa: BLE001 - anything else must not leak a traceback
        log.exception("site %s: unexpected failure", site)
        return refuse(SITE_FAILURE, f"failed: internal error ({type(exc).__name__}); details in the site's log")
