"""The medae ServerApp: federated training of one shared model.

The round loop is medae's own (so that a run saves after every round, resumes
after a restart and keeps a record per site), but sampling sites and averaging
their weights are done by Flower's strategies (`server.strategy`):
``configure_train`` / ``aggregate_train`` and ``configure_evaluate``.

Each round: sites train (replies: weights, loss, ε) → check every reply
(`medae_core.federated.check_update`, `RunState.check_epsilon`; a failing one
is left out of the round with its reason) → aggregate → sites
evaluate the new global model (replies: validation loss, histogram counts,
test metrics; in the last round first the validation half, then the test half
at the threshold it set) → pool the histograms into a threshold and pooled metrics →
save ``RUN/model/`` (the bundle `medae score` reads), ``RUN/state.json`` and
``RUN/metrics.json``. After the last round: ``RUN/report.html``.

Who a reply comes from: in deployment, the site whose key the coordinator
registered for the replying node (``RUN/sites.json``, run config key
``site-registry``), whatever name the reply itself carries; in simulation,
the name the ClientApp derives from its partition.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.serverapp import Grid, ServerApp

from medae_core import contract as c
from medae_core.bundle import Bundle, Threshold, load_bundle, save_bundle
from medae_core.config import RunConfig
from medae_core.federated import (
    RunState,
    check_update,
    pool_evaluations,
    rates_at_threshold,
    read_site_registry,
)
from medae_core.models import build_model
from medae_core.starts import initial_weights
from medae_core.report import reference_images, report_figures, round_summary, write_metrics, write_report
from medae_core.scoring import N_SCORE_BINS
from medae_core.site import NOISE_TO_SIGNAL_WARNING, noise_advice
from medae_core.tracking import RunTracker
from server.strategy import build_strategy

log = logging.getLogger("medae.server")
app = ServerApp()

REPLY_TIMEOUT_S = 24 * 3600.0  # a hospital's round can take hours on CPU
SITE_WAIT_S = 600.0  # simulation: the longest round 1 waits for the virtual sites to register
SITE_WAIT_LOG_S = 10.0  # and how often it says how many have


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = RunConfig.from_flat(context.run_config)
    run_dir = Path(str(context.run_config[c.RUN_DIR]))
    registry = str(context.run_config.get(c.RUN_SITE_REGISTRY, "") or "")
    expected = int(context.run_config.get(c.RUN_EXPECTED_SITES, 0) or 0)
    FederatedRun(grid, cfg, run_dir, registry=read_site_registry(Path(registry)) if registry else None,
                 expected_sites=expected or None).run()


def evaluates(rnd: int, rounds: int, every: int) -> bool:
    """Whether round ``rnd`` of ``rounds`` evaluates the global model: every ``every`` rounds, and always the last."""
    return rnd == rounds or rnd % every == 0


def warn_noisy_sites(sites: dict[str, dict], cfg: RunConfig) -> list[str]:
    """One warning for every site whose DP noise outweighs its clipped signal (each reply's ``noise_to_signal``).

    Returns those sites, noisiest first. At 1,000 simulated sites this is one line, not 1,000.
    """
    noisy = sorted(((s["noise_to_signal"], name) for name, s in sites.items()
                    if s.get("status") == "ok" and (s.get("noise_to_signal") or 0.0) > NOISE_TO_SIGNAL_WARNING),
                   reverse=True)
    if noisy:
        low, high = noisy[-1][0], noisy[0][0]
        spread = f"{high:.1f}×" if f"{low:.1f}" == f"{high:.1f}" else f"{low:.1f}–{high:.1f}×"
        named = ", ".join(name for _, name in noisy[:3]) + (f" and {len(noisy) - 3} more" if len(noisy) > 3 else "")
        log.warning("DP noise is %s the clipped signal at %d of %d sites (%s); %s", spread, len(noisy),
                    len(sites), named, noise_advice(cfg))
    return [name for _, name in noisy]


class FederatedRun:
    def __init__(self, grid: Grid, cfg: RunConfig, run_dir: Path, registry: dict[int, str] | None = None,
                 expected_sites: int | None = None):
        self.grid = grid
        self.cfg = cfg
        self.run_dir = run_dir
        self.state = RunState.open(run_dir, cfg)
        self.strategy = build_strategy(cfg.federation)
        self.registry = registry  # node id -> site (deployment); None: names from the replies (simulation)
        self.site_of_node: dict[int, str] = dict(registry or {})
        # Simulation only (`c.RUN_EXPECTED_SITES`): the sites to wait for before round 1 samples.
        # A deployment has no such key: its sites join when they join (`federation.min_sites`).
        self.expected_sites = expected_sites

    def initial_arrays(self) -> ArrayRecord:
        if self.state.rounds_done > 0:
            log.info("resuming run %s after round %d", self.state.run_id, self.state.rounds_done)
            return ArrayRecord(load_bundle(self.run_dir / "model").state_dict)
        # Round 0's global model: train.init (a public model by default), else a seeded random start.
        state_dict, provenance = initial_weights(self.cfg)
        self.state.init = provenance
        if provenance is not None:
            log.info("starting from %s (%s)", provenance["init"], provenance["data"])
        else:
            state_dict = build_model(self.cfg.model, seed=self.cfg.train.seed).state_dict()
            log.info("starting from a random initialisation (train.init = \"none\")")
        return ArrayRecord(state_dict)

    def run(self) -> None:
        tracker = RunTracker(self.run_dir, self.cfg, self.state.run_id)
        try:
            self._run(tracker)
        except BaseException:
            tracker.close(failed=True)
            raise
        tracker.close()

    def _run(self, tracker: RunTracker) -> None:
        rounds = self.cfg.federation.rounds
        arrays = self.initial_arrays()
        threshold = self.last_evaluated().get("threshold")  # a resumed run may stop after an unevaluated round
        if self.expected_sites:
            self.await_sites(self.expected_sites)
        for rnd in range(self.state.rounds_done + 1, rounds + 1):
            log.info("round %d/%d: training", rnd, rounds)
            started = time.monotonic()
            arrays, train_record = self.train_round(rnd, arrays)
            timing = {"train_seconds": time.monotonic() - started}
            eval_record = {}
            if evaluates(rnd, rounds, self.cfg.federation.evaluate_every):
                log.info("round %d/%d: evaluating", rnd, rounds)
                started = time.monotonic()
                eval_record = (self.evaluate_round(rnd, arrays, threshold) if rnd < rounds
                               else self.evaluate_last_round(rnd, arrays, threshold))
                timing["eval_seconds"] = time.monotonic() - started
                threshold = eval_record.get("threshold", threshold)
            record = {"round": rnd, **train_record, **eval_record, **timing}
            self.state.rounds.append(record)
            self.state.rounds_done = rnd
            self.save(arrays, threshold)
            tracker.log_round(record)
            log.info("round %d/%d done: %s", rnd, rounds, round_summary(record))
        report = write_report(self.run_dir, self.metrics(), load_bundle(self.run_dir / "model"),
                              reference=reference_images(self.cfg))
        tracker.log_figures(report_figures(report), rounds)
        log.info("run %s complete: %s", self.state.run_id, self.run_dir)

    def await_sites(self, expected: int, timeout_s: float = SITE_WAIT_S, poll_s: float = 0.2) -> int:
        """Wait (at most ``timeout_s``) until ``expected`` sites are connected; return how many are.

        Flower's Simulation Runtime starts the ServerApp while it is still
        registering the virtual nodes, and a strategy samples the nodes
        connected once ``federation.min_sites`` are: at 1,000 sites, round 1
        trained 251 of them. Past the timeout the run goes on with the sites
        there are, and says so.
        """
        started = last_log = time.monotonic()
        while (connected := len(list(self.grid.get_node_ids()))) < expected:
            now = time.monotonic()
            if now - started >= timeout_s:
                log.warning("only %d of %d sites registered after %.0f s; training starts with them",
                            connected, expected, now - started)
                return connected
            if now - last_log >= SITE_WAIT_LOG_S:
                log.info("waiting for the sites to register: %d of %d", connected, expected)
                last_log = now
            time.sleep(poll_s)
        log.info("%d of %d sites registered", connected, expected)
        return connected

    # -- one round --------------------------------------------------------------
    def train_round(self, rnd: int, arrays: ArrayRecord) -> tuple[ArrayRecord, dict]:
        config = ConfigRecord({c.ROUND_RUN_ID: self.state.run_id,
                               c.ROUND_ROUNDS_LEFT: self.cfg.federation.rounds - rnd + 1})
        messages = self.strategy.configure_train(rnd, arrays, config, self.grid)
        replies = list(self.grid.send_and_receive(messages, timeout=REPLY_TIMEOUT_S))
        sites, accepted = self.site_records(replies, train=True, global_arrays=arrays)
        if rnd == 1:
            warn_noisy_sites(sites, self.cfg)
        new_arrays, _ = self.strategy.aggregate_train(rnd, accepted) if accepted else (None, None)
        if new_arrays is None:
            log.warning("round %d: no site trained; the global model is unchanged", rnd)
            new_arrays = arrays
        ok = [s for s in sites.values() if s["status"] == "ok"]
        weights = np.array([s["num_examples"] for s in ok], dtype=float)
        loss = float(np.average([s["loss"] for s in ok], weights=weights)) if ok and weights.sum() else None
        return new_arrays, {"train_loss": loss, "sites": sites}

    def evaluate_round(self, rnd: int, arrays: ArrayRecord, threshold: float | None, part: str = "") -> dict:
        """One evaluation of the global model: its validation loss and threshold, and test metrics at ``threshold``.

        ``part``: only the validation half (`c.EVALUATE_VALIDATION`) or the test half (`c.EVALUATE_TEST`).
        """
        values = {} if threshold is None else {c.ROUND_THRESHOLD: float(threshold)}
        config = ConfigRecord(values | ({c.ROUND_EVALUATE: part} if part else {}))
        messages = self.strategy.configure_evaluate(rnd, arrays, config, self.grid)
        replies = list(self.grid.send_and_receive(messages, timeout=REPLY_TIMEOUT_S))
        sites, _ = self.site_records(replies, train=False, threshold=threshold, part=part)
        ok = [s for s in sites.values() if s["status"] == "ok"]
        pooled = pool_evaluations(
            [s.pop("histograms") for s in ok], self.cfg.scoring.threshold_percentile, threshold
        )
        with_loss = [s for s in ok if s["val_loss"] is not None]
        weights = np.array([s["num_val"] for s in with_loss], dtype=float)
        val_loss = (float(np.average([s["val_loss"] for s in with_loss], weights=weights))
                    if with_loss and weights.sum() else None)
        record = {"val_loss": val_loss, "eval_sites": sites, **pooled}
        return record

    def evaluate_last_round(self, rnd: int, arrays: ArrayRecord, threshold: float | None) -> dict:
        """The last evaluation: the threshold from the sites' validation halves, then their test halves at it.

        The decisions and Dice the run reports are at the model's own final
        threshold, and every site evaluates each image once.
        """
        val = self.evaluate_round(rnd, arrays, threshold, part=c.EVALUATE_VALIDATION)
        final_threshold = val.get("threshold", threshold)
        test = self.evaluate_round(rnd, arrays, final_threshold, part=c.EVALUATE_TEST)
        sites = {}
        for name in dict.fromkeys([*val["eval_sites"], *test["eval_sites"]]):
            v, t = val["eval_sites"].get(name), test["eval_sites"].get(name)
            if v is not None and t is not None and v["status"] == t["status"] == "ok":
                sites[name] = {**t, "val_loss": v["val_loss"]}
            else:  # the half that failed (validation's first), or the only half there is
                sites[name] = v if v is not None and (v["status"] != "ok" or t is None) else t
        record = {k: v for k, v in test.items() if k not in ("val_loss", "threshold", "n_healthy")}
        record |= {"val_loss": val["val_loss"], "eval_sites": sites}
        record |= {k: val[k] for k in ("threshold", "n_healthy") if k in val}
        return record

    def site_records(
        self, replies: list[Message], train: bool, global_arrays: ArrayRecord | None = None,
        threshold: float | None = None, part: str = "",
    ) -> tuple[dict[str, dict], list[Message]]:
        """Per-site view of the replies, and the replies whose content may be used.

        Refusals keep their (path-free) reason. A reply that is malformed, comes
        from an unregistered node or a site already heard from this round, or
        fails `check_update` / `RunState.check_epsilon`, is ``rejected`` with
        its reason and left out; no reply can stop the run.
        """
        records: dict[str, dict] = {}
        accepted: list[Message] = []
        global_state = {k: v.numpy() for k, v in global_arrays.items()} if global_arrays is not None else None
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                name = self.name_of_error(node, reply.error.reason or "")
                records[name] = {"status": "refused", "code": reply.error.code, "reason": reply.error.reason}
                log.warning("%s: %s", name, reply.error.reason)
                continue
            try:
                name = self.name_of(node, str(reply.content["site"][c.SITE_NAME]))
                if name in records:
                    raise RejectedReply(name, "a second reply from this site in one round")
                record = (self.train_record(name, reply, global_state) if train
                          else self.eval_record(name, reply, threshold, part))
            except RejectedReply as exc:
                key = exc.site if exc.site not in records else f"{exc.site} (node {node})"  # keep the first
                records[key] = {"status": "rejected", "reason": f"site {exc.site}: update rejected: {exc}"}
                log.warning("site %s: update rejected: %s", exc.site, exc)
                continue
            except Exception as exc:  # noqa: BLE001 - a malformed reply must not stop the run
                name = self.site_of_node.get(node, f"node-{node}")
                records[name] = {"status": "rejected",
                                 "reason": f"site {name}: malformed reply ({type(exc).__name__})"}
                log.warning("node %s (%s): malformed reply", node, name, exc_info=True)
                continue
            records[name] = record
            accepted.append(reply)
        return records, accepted

    def name_of(self, node: int, claimed: str) -> str:
        """The site a reply is from: the registered one in deployment, the claimed one in simulation."""
        if self.registry is None:
            self.site_of_node[node] = claimed
            return claimed
        if node not in self.registry:
            raise RejectedReply(f"node-{node}", "the node is not one the coordinator registered")
        name = self.registry[node]
        if claimed != name:
            log.warning("node %s is registered as site %s but calls itself %r; it is counted as %s",
                        node, name, claimed, name)
        return name

    def name_of_error(self, node: int, reason: str) -> str:
        if self.registry is not None:
            return self.registry.get(node, f"node-{node}")
        # medae sites name themselves in their reasons; Flower's own errors don't.
        return c.refusing_site(reason) or self.site_of_node.get(node, f"node-{node}")

    def train_record(self, name: str, reply: Message, global_state: dict | None) -> dict:
        unit = str(reply.content["site"][c.SITE_UNIT])
        m = dict(reply.content["metrics"])
        record = {
            "status": "ok",
            "loss": float(m["loss"]),
            "num_examples": int(m["num-examples"]),
            "epsilon": float(m["epsilon"]),
            "delta": float(m["delta"]),
            "budget_epsilon": float(m["budget-epsilon"]),
            "noise_multiplier": float(m["noise-multiplier"]),
            "privacy_unit": unit,
            "seconds": float(m["seconds"]),
            "trained_parameters": int(m["trained-parameters"]),
            "noise_to_signal": float(m["noise-to-signal"]) if m["noise-multiplier"] else None,
        }
        problem = self.state.check_epsilon(name, record["epsilon"], record["budget_epsilon"]) if (
            self.cfg.privacy.enabled) else None
        if problem is None and global_state is not None:
            update = {k: v.numpy() for k, v in reply.content["arrays"].items()}
            problem = check_update(global_state, update, steps=int(m["steps"]), lr=self.cfg.train.lr)
        if problem is not None:
            raise RejectedReply(name, problem)
        self.state.sites[name] = {
            **self.state.sites.get(name, {}),
            "site": name,
            "epsilon": record["epsilon"],
            "delta": record["delta"],
            "budget_epsilon": record["budget_epsilon"],
            "privacy_unit": unit,
            "num_examples": record["num_examples"],
        }
        return record

    def eval_record(self, name: str, reply: Message, threshold: float | None = None, part: str = "") -> dict:
        hist, test = c.split_eval_metrics(dict(reply.content["metrics"]))
        if part != c.EVALUATE_TEST and "healthy" not in hist:
            raise RejectedReply(name, "it has no healthy-score histogram")
        if part == c.EVALUATE_TEST:  # the test half only: its threshold came from the validation half
            hist.pop("healthy", None)
            test.pop("val_loss", None)
        for key, counts in hist.items():
            values = np.asarray(counts)
            if values.shape != (N_SCORE_BINS,) or not np.all(np.isfinite(values)) or np.any(values < 0):
                raise RejectedReply(name, f"its {key} is not {N_SCORE_BINS} non-negative counts")
        if threshold is not None and "image_pos" in hist and "image_neg" in hist:
            test.update(rates_at_threshold(hist["image_pos"], hist["image_neg"], threshold))
        record = {
            "status": "ok",
            "val_loss": float(test.pop("val_loss")) if part != c.EVALUATE_TEST else None,
            "num_val": int(test.pop("num_examples")),
            "test": test,
            "histograms": hist,
        }
        if test and name in self.state.sites:
            self.state.sites[name]["test"] = test
        return record

    # -- persistence ----------------------------------------------------------------
    def save(self, arrays: ArrayRecord, threshold: float | None) -> None:
        last = self.last_evaluated()  # the round that set the threshold
        bundle = Bundle(
            config=self.cfg,
            state_dict=arrays.to_torch_state_dict(),
            threshold=None
            if threshold is None
            else Threshold(
                value=float(threshold),
                percentile=self.cfg.scoring.threshold_percentile,
                n_healthy=int(last.get("n_healthy", 0)),
                method="federated-histogram",
            ),
            info={"run_id": self.state.run_id, "round": self.state.rounds_done, "sites": sorted(self.state.sites),
                  "init": self.state.init},
        )
        save_bundle(self.run_dir / "model", bundle)
        self.state.save(self.run_dir)
        write_metrics(self.run_dir, self.metrics())

    def last_evaluated(self) -> dict:
        """The last round record with a threshold (`federation.evaluate_every` may skip rounds); {} before one."""
        return next((r for r in reversed(self.state.rounds) if r.get("threshold") is not None), {})

    def metrics(self) -> dict:
        last = self.state.rounds[-1] if self.state.rounds else {}
        final = last.get("final", last)
        return {
            "run_id": self.state.run_id,
            "rounds_done": self.state.rounds_done,
            "rounds": self.state.rounds,
            "sites": list(self.state.sites.values()),
            "threshold": final.get("threshold"),
            "test": final.get("test"),
            "intensity_baseline": final.get("baseline"),
            "init": self.state.init,
            "config": self.cfg.to_dict(),
        }


class RejectedReply(Exception):
    """A site's reply that is left out of the round; the message says why."""

    def __init__(self, site: str, reason: str):
        super().__init__(reason)
        self.site = site
