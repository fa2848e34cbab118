"""The medae ServerApp: federated training of one shared model.

The round loop is medae's own (so that a run saves after every round, resumes
after a restart and keeps a record per site), but sampling sites and averaging
their weights are done by Flower's strategies (`server.strategy`):
``configure_train`` / ``aggregate_train`` and ``configure_evaluate``.

Each round: sites train (replies: weights, loss, ε) → aggregate → sites
evaluate the new global model (replies: validation loss, histogram counts,
test metrics) → pool the histograms into a threshold and pooled metrics →
save ``RUN/model/`` (the bundle `medae score` reads), ``RUN/state.json`` and
``RUN/metrics.json``. After the last round: ``RUN/report.html``.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.serverapp import Grid, ServerApp

from medae_core.bundle import Bundle, Threshold, load_bundle, save_bundle
from medae_core.config import RunConfig
from medae_core.federated import RunState, pool_evaluations
from medae_core.models import build_model
from medae_core.pretrain import initial_weights
from medae_core.report import reference_images, write_metrics, write_report
from server.strategy import build_strategy

log = logging.getLogger("medae.server")
app = ServerApp()

REPLY_TIMEOUT_S = 24 * 3600.0  # a hospital's round can take hours on CPU


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = RunConfig.from_flat(context.run_config)
    run_dir = Path(str(context.run_config["run-dir"]))
    FederatedRun(grid, cfg, run_dir).run()


class FederatedRun:
    def __init__(self, grid: Grid, cfg: RunConfig, run_dir: Path):
        self.grid = grid
        self.cfg = cfg
        self.run_dir = run_dir
        self.state = RunState.open(run_dir, cfg)
        self.strategy = build_strategy(cfg.federation)
        self.site_of_node: dict[int, str] = {}

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
        rounds = self.cfg.federation.rounds
        arrays = self.initial_arrays()
        threshold = self.state.rounds[-1].get("threshold") if self.state.rounds else None
        for rnd in range(self.state.rounds_done + 1, rounds + 1):
            log.info("round %d/%d: training", rnd, rounds)
            arrays, train_record = self.train_round(rnd, arrays)
            log.info("round %d/%d: evaluating", rnd, rounds)
            eval_record = self.evaluate_round(rnd, arrays, threshold)
            threshold = eval_record.get("threshold", threshold)
            record = {"round": rnd, **train_record, **eval_record}
            self.state.rounds.append(record)
            self.state.rounds_done = rnd
            self.save(arrays, threshold)
            log.info("round %d/%d done: %s", rnd, rounds, round_summary(record))
        if threshold is not None and self.state.rounds:
            # Final pass at the final threshold: Dice and decisions at that threshold.
            final = self.evaluate_round(rounds, arrays, threshold)
            self.state.rounds[-1]["final"] = final
            self.save(arrays, threshold)
        write_report(self.run_dir, self.metrics(), load_bundle(self.run_dir / "model"),
                     reference=reference_images(self.cfg))
        log.info("run %s complete: %s", self.state.run_id, self.run_dir)

    # -- one round --------------------------------------------------------------
    def train_round(self, rnd: int, arrays: ArrayRecord) -> tuple[ArrayRecord, dict]:
        config = ConfigRecord({"run-id": self.state.run_id, "rounds-left": self.cfg.federation.rounds - rnd + 1})
        messages = self.strategy.configure_train(rnd, arrays, config, self.grid)
        replies = list(self.grid.send_and_receive(messages, timeout=REPLY_TIMEOUT_S))
        sites = self.site_records(replies, train=True)
        new_arrays, _ = self.strategy.aggregate_train(rnd, [r for r in replies if not r.has_error()])
        if new_arrays is None:
            log.warning("round %d: no site trained; the global model is unchanged", rnd)
            new_arrays = arrays
        ok = [s for s in sites.values() if s["status"] == "ok"]
        weights = np.array([s["num_examples"] for s in ok], dtype=float)
        loss = float(np.average([s["loss"] for s in ok], weights=weights)) if ok and weights.sum() else None
        return new_arrays, {"train_loss": loss, "sites": sites}

    def evaluate_round(self, rnd: int, arrays: ArrayRecord, threshold: float | None) -> dict:
        config = ConfigRecord({} if threshold is None else {"threshold": float(threshold)})
        messages = self.strategy.configure_evaluate(rnd, arrays, config, self.grid)
        replies = list(self.grid.send_and_receive(messages, timeout=REPLY_TIMEOUT_S))
        sites = self.site_records(replies, train=False)
        ok = [s for s in sites.values() if s["status"] == "ok"]
        pooled = pool_evaluations(
            [s.pop("histograms") for s in ok], self.cfg.scoring.threshold_percentile, threshold
        )
        weights = np.array([s["num_val"] for s in ok], dtype=float)
        val_loss = float(np.average([s["val_loss"] for s in ok], weights=weights)) if ok and weights.sum() else None
        record = {"val_loss": val_loss, "eval_sites": sites, **pooled}
        return record

    def site_records(self, replies: list[Message], train: bool) -> dict[str, dict]:
        """Per-site view of the replies; refusals keep their (path-free) reason."""
        records: dict[str, dict] = {}
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                # medae sites start their reasons with "site NAME:"; Flower's own errors don't.
                named = re.match(r"site (\S+): ", reply.error.reason or "")
                name = named.group(1) if named else self.site_of_node.get(node, f"node-{node}")
                records[name] = {"status": "refused", "code": reply.error.code, "reason": reply.error.reason}
                log.warning("%s: %s", name, reply.error.reason)
                continue
            name = str(reply.content["site"]["site"])
            unit = str(reply.content["site"]["privacy-unit"])
            self.site_of_node[node] = name
            m = dict(reply.content["metrics"])
            if train:
                records[name] = {
                    "status": "ok",
                    "loss": m["loss"],
                    "num_examples": int(m["num-examples"]),
                    "epsilon": m["epsilon"],
                    "delta": m["delta"],
                    "budget_epsilon": m["budget-epsilon"],
                    "noise_multiplier": m["noise-multiplier"],
                    "privacy_unit": unit,
                    "seconds": m["seconds"],
                    "trained_parameters": int(m["trained-parameters"]),
                    "noise_to_signal": m["noise-to-signal"] if m["noise-multiplier"] else None,
                }
                self.state.sites[name] = {
                    "site": name,
                    "epsilon": m["epsilon"],
                    "delta": m["delta"],
                    "budget_epsilon": m["budget-epsilon"],
                    "privacy_unit": unit,
                    "num_examples": int(m["num-examples"]),
                }
            else:
                hist = {k.removesuffix("-hist").replace("-", "_"): v for k, v in m.items() if k.endswith("-hist")}
                hist["healthy_hist"] = hist.pop("healthy")
                test = {k.replace("-", "_"): v for k, v in m.items() if not k.endswith("-hist")}
                records[name] = {
                    "status": "ok",
                    "val_loss": test.pop("val_loss"),
                    "num_val": int(test.pop("num_examples")),
                    "test": test,
                    "histograms": hist,
                }
                if test and name in self.state.sites:
                    self.state.sites[name]["test"] = test
        return records

    # -- persistence ----------------------------------------------------------------
    def save(self, arrays: ArrayRecord, threshold: float | None) -> None:
        last = self.state.rounds[-1]
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


def round_summary(record: dict) -> str:
    parts = []
    if record.get("train_loss") is not None:
        parts.append(f"train loss {record['train_loss']:.4f}")
    if record.get("val_loss") is not None:
        parts.append(f"val loss {record['val_loss']:.4f}")
    eps = [f"{n} ε={s['epsilon']:.2f}" for n, s in record["sites"].items() if s["status"] == "ok"]
    refused = [n for n, s in record["sites"].items() if s["status"] != "ok"]
    if eps:
        parts.append(", ".join(eps))
    if refused:
        parts.append("refused: " + ", ".join(refused))
    auroc = (record.get("test") or {}).get("image_auroc")
    if auroc is not None:
        parts.append(f"image AUROC {auroc:.3f}")
    return "; ".join(parts)
