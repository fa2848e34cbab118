"""One site's evaluation message: `SiteTrainer.evaluate` (validation loss and scores, test metrics).

    python benchmarks/eval_site.py SITE [--repeats 5]

SITE is a site folder (e.g. ``runs/quickstart/data/site-1``). The default
configuration's model with seed-0 weights, 1 torch thread; one untimed call,
then ``--repeats`` timed ones. Prints the median seconds of ``evaluate`` and of
the anomaly-map post-processing inside it (`scoring.postprocess`: median filter,
foreground masking), and which checkout ran. To compare code versions, run it
with ``PYTHONPATH`` at another checkout.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("site", type=Path)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    import torch

    import medae_core
    from medae_core import scoring
    from medae_core.config import RunConfig
    from medae_core.models import build_model
    from medae_core.site import SiteTrainer, load_site_data

    torch.set_num_threads(1)
    cfg = RunConfig()
    data = load_site_data(args.site.absolute(), cfg)
    trainer = SiteTrainer(data, cfg, None)
    weights = build_model(cfg.model, seed=0).state_dict()
    trainer.evaluate(weights, threshold=0.1)  # untimed: first-call costs

    spent: list[float] = []
    real = scoring.postprocess

    def timed(*a, **k):
        started = time.perf_counter()
        try:
            return real(*a, **k)
        finally:
            spent.append(time.perf_counter() - started)

    scoring.postprocess = timed  # the scoring functions call it through the module
    runs = []
    for _ in range(args.repeats):
        spent.clear()
        started = time.perf_counter()
        trainer.evaluate(weights, threshold=0.1)
        runs.append((time.perf_counter() - started, sum(spent)))
    maps = len(data.val_images) + (len(data.test.images) if data.test is not None else 0)
    print(f"code {Path(medae_core.__file__).parent.parent}; {maps} validation and test images; "
          f"evaluate {statistics.median(r[0] for r in runs):.2f} s, of which post-processing "
          f"{statistics.median(r[1] for r in runs):.2f} s (medians of {args.repeats})")


if __name__ == "__main__":
    main()
