"""Small, fast experiments behind medae's DP defaults (benchmarks/RESULTS-privacy-utility.md).

    python benchmarks/dp_recipe.py pretrain --public DIR/public --out START.pt [--epochs 30]
    python benchmarks/dp_recipe.py federate --bench DIR [--init START.pt] [--rounds 5] \
        [--set privacy.clipping=automatic --set train.lr=0.001 ...] [--tag NAME]
    python benchmarks/dp_recipe.py zero-shot --bench DIR --init START.pt

A federation here is FedAvg written out in a few lines over the same
`medae_core.site.SiteTrainer` the ClientApp calls (no Flower, no Ray), so one
configuration takes 1-2 minutes on 2 CPU cores; the numbers quoted in
BENCHMARKS.md come from `benchmarks/privacy_utility.py`, which runs the real
`medae simulate`. Each run appends one JSON line to ``--log``. Image AUROC is
exact on the pooled test sets of all sites, and per site.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from medae_core.config import RunConfig  # noqa: E402


def pretrain_state(public_dir: Path, cfg: RunConfig, epochs: int) -> dict:
    from medae_core.models import build_model
    from medae_core.site import load_site_data
    from medae_core.training import train
    from medae_core.units import plan_training

    c = cfg.with_overrides({"privacy.enabled": False, "privacy.unit": "image", "train.epochs": epochs,
                            "train.trainable": "all", "train.lr": 2e-3})
    d = load_site_data(public_dir, c, name="public")
    model = build_model(c.model, seed=0)
    train(model, d.train_images, None, plan_training(len(d.train_images), c.train, epochs), c, noise_multiplier=None)
    return {k: v.clone() for k, v in model.state_dict().items()}


def federate(cfg: RunConfig, sites: list[Path], init: dict | None, rounds: int, tmp: Path,
             server_momentum: float = 0.0, tail: int = 1):
    from medae_core.privacy import PrivacyLedger
    from medae_core.site import SiteTrainer, load_site_data

    datas = [load_site_data(s, cfg) for s in sites]
    trainers = [SiteTrainer(d, cfg, PrivacyLedger.for_config(cfg.privacy, site=d.name,
                                                             path=tmp / f"{d.name}-{uuid.uuid4().hex[:6]}.jsonl")
                            if cfg.privacy.enabled else None) for d in datas]
    state, last, momentum, history = init, [], None, []
    for r in range(1, rounds + 1):
        last = [t.train_round(state, run_id="recipe", server_round=r, rounds_left=rounds - r + 1) for t in trainers]
        w = np.array([x.num_examples for x in last], float)
        w /= w.sum()
        mean = {k: sum(wi * x.state_dict[k].float() for wi, x in zip(w, last)) for k in last[0].state_dict}
        if state is None or server_momentum == 0.0:
            state = mean
        else:
            # FedAvgM (Hsu et al. 2019): heavy-ball momentum on the averaged update.
            delta = {k: mean[k] - state[k].float() for k in mean}
            momentum = delta if momentum is None else {k: server_momentum * momentum[k] + delta[k] for k in delta}
            state = {k: state[k].float() + momentum[k] for k in delta}
        history.append(state)
    if tail > 1:
        # Tail averaging of the global models: the DP noise random-walks, the signal does not.
        kept = history[-tail:]
        state = {k: sum(h[k] for h in kept) / len(kept) for k in state}
    return state, datas, trainers, last


def image_aurocs(cfg: RunConfig, state: dict, datas, trainers) -> dict:
    from medae_core.evaluation import LabelledSet, evaluate_model

    model, device = trainers[0].model(state), trainers[0].device
    out = {"pooled": evaluate_model(model, LabelledSet.pooled([d.test for d in datas]), cfg, device, None)["image_auroc"]}
    for d in datas:
        out[d.name] = evaluate_model(model, LabelledSet.of(d.test), cfg, device, None)["image_auroc"]
    return {k: round(v, 3) for k, v in out.items()}


def parse_sets(items: list[str]) -> dict:
    over = {}
    for kv in items:
        key, value = kv.split("=", 1)
        try:
            over[key] = json.loads(value)
        except json.JSONDecodeError:
            over[key] = value
    return over


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=("pretrain", "federate", "zero-shot"))
    ap.add_argument("--public", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--bench", type=Path)
    ap.add_argument("--init", type=Path)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--server-momentum", type=float, default=0.0, help="FedAvgM momentum (0 = FedAvg)")
    ap.add_argument("--tail", type=int, default=1, help="average the last N global models")
    ap.add_argument("--tag", default="")
    ap.add_argument("--log", type=Path, default=Path("runs/dp-recipe.jsonl"))
    a = ap.parse_args()
    cfg = RunConfig().with_overrides({"train.num_threads": 2, "train.init": "none", **parse_sets(a.set)})
    if a.action == "pretrain":
        torch.save(pretrain_state(a.public, cfg, a.epochs), a.out)
        return 0
    sites = sorted(p for p in a.bench.iterdir() if p.is_dir() and p.name.startswith("site"))
    init = torch.load(a.init) if a.init else None
    start = time.time()
    if a.action == "zero-shot":
        from medae_core.site import SiteTrainer, load_site_data

        datas = [load_site_data(s, cfg) for s in sites]
        rec = {"tag": a.tag or "zero-shot", "auroc": image_aurocs(cfg, init, datas,
                                                                  [SiteTrainer(d, cfg, None) for d in datas])}
    else:
        with tempfile.TemporaryDirectory() as tmp:
            state, datas, trainers, last = federate(cfg, sites, init, a.rounds, Path(tmp),
                                                   a.server_momentum, a.tail)
        rec = {"tag": a.tag, "init": str(a.init or ""), "rounds": a.rounds, "set": parse_sets(a.set),
               "server_momentum": a.server_momentum, "tail": a.tail,
               "auroc": image_aurocs(cfg, state, datas, trainers),
               "epsilon": [round(x.epsilon, 3) for x in last], "sigma": [x.noise_multiplier for x in last],
               "noise_to_signal": [x.noise_to_signal for x in last]}
    rec["seconds"] = round(time.time() - start)
    print(json.dumps(rec))
    a.log.parent.mkdir(parents=True, exist_ok=True)
    with a.log.open("a") as fh:
        fh.write(json.dumps(rec) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
