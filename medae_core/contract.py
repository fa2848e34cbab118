"""The contract between medae's apps: every key one side writes and another reads, in one place.

Flower carries three kinds of settings and one kind of reply between the
coordinator (`medae.simulate`, `medae.deploy`, `server.app`) and a site
(`medae.deploy`'s join, `client.app`):

- the **run config**, the same for both apps: the flat `RunConfig`
  (`RunConfig.to_flat` / `from_flat`) plus `RUN_DIR` and, in deployment,
  `RUN_SITE_REGISTRY`, in simulation `RUN_EXPECTED_SITES` and `RUN_SITE_SNAPSHOTS`;
- a site's **node config**, its own and never sent: where its data and ledger
  are and its privacy policy (`NODE_*`, written by `medae client`), or in
  simulation Flower's `PARTITION_ID`;
- each round's **message config**, from the ServerApp: `ROUND_*` keys;
- the **replies**: the metrics a site may send (`TRAIN_METRICS`,
  `EVAL_METRICS`, nothing else), its `SITE_FIELDS`, or a refusal whose reason
  names the site (`refusal`, `refusing_site`).

Which folders are sites is `medae_core.data.site_folders`, used by
`medae simulate` and the ClientApp alike. Nothing here imports Flower.
"""

from __future__ import annotations

import re

# -- run config ---------------------------------------------------------------
RUN_DIR = "run-dir"  # the coordinator's run folder (simulation: also where simulated sites keep ledgers)
RUN_SITE_REGISTRY = "site-registry"  # deployment: path of RUN/sites.json, node id -> registered site
# Simulation: how many virtual sites will register. Flower starts the ServerApp while it is still
# registering them, so round 1 waits for them all before sampling (`server.app.FederatedRun.await_sites`).
RUN_EXPECTED_SITES = "expected-sites"
# Simulation: a private temporary folder where the first Ray actor to read a site keeps it for the
# others (`medae_core.site.load_site_data`'s ``snapshots``). A deployed site never uses it.
RUN_SITE_SNAPSHOTS = "site-snapshots"

# -- node config (a site's own; never leaves it) -------------------------------
NODE_DATA_PATH = "data-path"
NODE_LEDGER_PATH = "ledger-path"
NODE_SITE_NAME = "site-name"
NODE_ALLOW_NO_DP = "allow-no-dp"
NODE_PRIVACY_UNIT = "privacy-unit"
NODE_DEVICE = "device"
NODE_IMAGE_CACHE = "image-cache"  # the site keeps decoded images between runs (`medae client --image-cache`)
PARTITION_ID = "partition-id"  # Flower's simulation node config: site folder k of federation.data_root

# -- message config (ServerApp -> site, each round) -----------------------------
ROUND = "server-round"  # set by Flower's strategies
ROUND_RUN_ID = "run-id"
ROUND_ROUNDS_LEFT = "rounds-left"
ROUND_PROXIMAL_MU = "proximal-mu"
ROUND_THRESHOLD = "threshold"  # evaluation at the pooled threshold of the previous round
# Which half of an evaluation a site runs; absent: both. The last round asks for the validation
# half (the healthy-score histograms that set the threshold), then for the test half at that
# threshold, instead of evaluating twice (`server.app.FederatedRun.evaluate_last_round`).
ROUND_EVALUATE = "evaluate"
EVALUATE_VALIDATION, EVALUATE_TEST = "validation", "test"

# -- replies (site -> ServerApp): all that may leave a site besides the weights --
TRAIN_METRICS = (
    "num-examples",
    "loss",
    "steps",
    "epsilon",
    "delta",
    "budget-epsilon",
    "noise-multiplier",
    "sample-rate",
    "seconds",
    "images-per-second",
    "trained-parameters",
    "noise-to-signal",
)
# Label-split score histograms (`scoring.score_histogram` counts), by their name in
# `medae_core.evaluation` and `medae_core.federated.pool_evaluations`.
HISTOGRAMS = ("healthy", "image_pos", "image_neg", "pixel_pos", "pixel_neg", "baseline_image_pos",
              "baseline_image_neg")
# A site's exact test metrics (`medae_core.evaluation.evaluate_site`) that it reports.
EXACT_METRICS = ("image_auroc", "image_auprc", "pixel_auroc", "pixel_auprc", "dice_best", "dice_at_threshold",
                 "baseline_image_auroc")


def wire(name: str) -> str:
    """A metric's key in a reply (Flower's records use ``-``) from its name in medae (``_``)."""
    return name.replace("_", "-")


def unwire(key: str) -> str:
    return key.replace("-", "_")


def histogram_key(name: str) -> str:
    return f"{wire(name)}-hist"


EVAL_METRICS = ("num-examples", "val-loss", *(histogram_key(h) for h in HISTOGRAMS),
                *(wire(m) for m in EXACT_METRICS))
SITE_NAME, SITE_UNIT = "site", "privacy-unit"  # the reply's "site" record
SITE_FIELDS = (SITE_NAME, SITE_UNIT)


def split_eval_metrics(metrics: dict) -> tuple[dict, dict]:
    """An evaluate reply's metrics as (histograms by `HISTOGRAMS` name, the other values by medae name)."""
    hist = {unwire(k.removesuffix("-hist")): v for k, v in metrics.items() if k.endswith("-hist")}
    rest = {unwire(k): v for k, v in metrics.items() if not k.endswith("-hist")}
    return hist, rest


# -- refusals -------------------------------------------------------------------
# Error codes of medae refusals (Flower's own codes are below 100).
BUDGET_EXCEEDED, NO_USABLE_DATA, LEDGER_PROBLEM, SITE_POLICY, SITE_FAILURE = 100, 101, 102, 103, 199

_REFUSING_SITE = re.compile(r"site (\S+): ")


def refusal(site: str, reason: str) -> str:
    """A refusal's reason: an error reply has no content, so it starts with the site's name."""
    return f"site {site}: {reason}"


def refusing_site(reason: str) -> str | None:
    """The site a medae refusal names (simulation only: in deployment the registry says who it is)."""
    named = _REFUSING_SITE.match(reason)
    return named.group(1) if named else None
