"""One site's evaluation message: `SiteTrainer.evaluate` (validation loss and scores, test metrics).

    python benchmarks/eval_site.py SITE

SITE is a site folder (e.g. ``runs/quickstart/data/site-1``). The default
configuration's model with seed-0 weights, 1 torch thread; one untimed call,
then 5 timed ones. Prints the median seconds of ``evaluate`` and of the
anomaly-map post-processing inside it (median filter, foreground masking). To
compare code versions, run it with ``PYTHONPATH`` at another checkout.
"""

import sys, time, pathlib, statistics
def main():
    import torch
    from medae_core.config import RunConfig
    from medae_core.site import load_site_data, SiteTrainer
    from medae_core.models import build_model
    import medae_core, medae_core.scoring as sc
    torch.set_num_threads(1)
    cfg = RunConfig()
    data = load_site_data(pathlib.Path(sys.argv[1]).absolute(), cfg)
    tr = SiteTrainer(data, cfg, None)
    sd = build_model(cfg.model, seed=0).state_dict()
    tr.evaluate(sd, threshold=0.1)
    n = len(data.val_images) + (len(data.test.images) if data.test is not None else 0)
    ts, meds = [], []
    real = sc.postprocess
    def timed(*a, **k):
        t = time.perf_counter(); r = real(*a, **k); meds.append(time.perf_counter() - t); return r
    sc.postprocess = timed
    import medae_core.evaluation as ev
    if hasattr(ev, "postprocess"): ev.postprocess = timed
    for _ in range(5):
        meds.clear()
        t = time.perf_counter(); tr.evaluate(sd, threshold=0.1); ts.append((time.perf_counter() - t, sum(meds)))
    print(medae_core.__file__, "maps", n, "evaluate s median", statistics.median(x for x, _ in ts),
          "postprocess s median", statistics.median(y for _, y in ts))
if __name__ == "__main__":
    main()
