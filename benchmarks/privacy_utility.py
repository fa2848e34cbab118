"""Privacy-utility curve: image AUROC against the per-site budget ε, on the built-in benchmark.

    python benchmarks/privacy_utility.py --out runs/privacy-utility
        [--patients 165,40] [--epsilons 1,2,4,8,16,inf] [--rounds N]

For each site size (patients per site; the default site size first) it writes
the built-in benchmark (3 sites, seed 0) and, for each ε (``inf`` = without
DP, i.e. ``--no-dp``), trains with the default configuration otherwise:

- the federation: ``medae simulate`` (the real ServerApp/ClientApp on Flower's
  simulation runtime);
- centralized DP: all sites' training patients pooled in one place, one ledger
  (what federation tries to approach without moving data);
- each site alone, with DP;

and scores each exactly on the pooled test sets of all sites, next to the
intensity-threshold baseline (which needs no training, so it is one number per
site size). Centralized and single-site models train for rounds x epochs, like
`medae simulate --baselines`.

Writes ``OUT/privacy_utility.json``, ``OUT/privacy_utility.md`` (the tables
BENCHMARKS.md quotes), ``OUT/privacy_utility.png`` and ``OUT/report.html``
(the plot and tables on one page). Runs take about 40-60 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import html
import json
import logging
import math
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medae_core.config import RunConfig  # noqa: E402

log = logging.getLogger("privacy_utility")


def row_names(sites: list[str]) -> list[str]:
    return ["federated", "centralized, DP", *(f"{s} alone" for s in sites)]


def run_size(out: Path, patients: int, epsilons: list[float], base: RunConfig) -> dict:
    from medae.simulate import prepare_and_run
    from medae_core.data import site_folders
    from medae_core.baselines import pool_sites, train_and_evaluate
    from medae_core.benchmark import make_benchmark
    from medae_core.bundle import load_bundle
    from medae_core.models import build_model
    from medae_core.pretrain import ensure_start
    from medae_core.starts import initial_weights
    from medae_core.evaluation import LabelledSet, evaluate_model, intensity_metrics
    from medae_core.site import load_site_data
    from medae_core.devices import resolve_device

    data_root = out / f"data-{patients}"
    default_size = patients == base.federation.benchmark_patients
    if not (data_root / "benchmark.json").exists():
        make_benchmark(data_root, sites=base.federation.sites, patients=patients, seed=base.federation.benchmark_seed,
                       test_patients=(base.federation.benchmark_test_patients or None) if default_size else None)
    sites = site_folders(data_root)[: base.federation.sites]
    cfg0 = base.with_overrides({"federation.data_root": str(data_root.resolve())})
    data = [load_site_data(s, cfg0) for s in sites]
    test = LabelledSet.pooled([d.test for d in data])
    site_tests = {d.name: LabelledSet.of(d.test) for d in data}
    intensity = intensity_metrics(test, cfg0)["image_auroc"]
    per_site_intensity = {name: intensity_metrics(t, cfg0)["image_auroc"] for name, t in site_tests.items()}
    device = resolve_device(cfg0.train.device)
    result = {"patients_per_site": patients, "train_patients": [d.n_train_patients for d in data],
              "intensity": intensity, "intensity_per_site": per_site_intensity, "by_epsilon": {}}
    # The public start itself (no site data, no ε): what private training must improve on.
    ensure_start(cfg0)
    state, provenance = initial_weights(cfg0)
    if state is not None:
        start = build_model(cfg0.model)
        start.load_state_dict(state)
        start = start.to(device).eval()
        result["zero_shot"] = evaluate_model(start, test, cfg0, device, None)["image_auroc"]
        result["zero_shot_per_site"] = {name: evaluate_model(start, t, cfg0, device, None)["image_auroc"]
                                        for name, t in site_tests.items()}
        result["init"] = provenance
    for eps in epsilons:
        key = "inf" if math.isinf(eps) else f"{eps:g}"
        cfg = cfg0.with_overrides({"privacy.enabled": False} if math.isinf(eps) else {"privacy.budget_epsilon": eps})
        run_dir = out / "runs" / f"{patients}" / f"eps-{key}"
        t0 = time.time()
        log.info("patients/site %d, ε=%s: federation", patients, key)
        if not (run_dir / "metrics.json").exists() or json.loads((run_dir / "metrics.json").read_text()).get(
                "rounds_done") != cfg.federation.rounds:
            prepare_and_run(cfg.with_overrides({"federation.reference": False}), run_dir)  # its own rows below
        bundle = load_bundle(run_dir / "model")
        model = bundle.build_model().to(device)
        rows = {"federated": evaluate_model(model, test, cfg, device, None)["image_auroc"]}
        per_site = {name: evaluate_model(model, t, cfg, device, None)["image_auroc"] for name, t in site_tests.items()}
        long = cfg.with_overrides({"train.epochs": cfg.train.epochs * cfg.federation.rounds})
        log.info("patients/site %d, ε=%s: centralized", patients, key)
        rows["centralized, DP"] = train_and_evaluate(pool_sites(data), long, test, run_dir / "ledgers-baselines")[
            "image_auroc"]
        for d in data:
            log.info("patients/site %d, ε=%s: %s alone", patients, key, d.name)
            rows[f"{d.name} alone"] = train_and_evaluate(d, long, test, run_dir / "ledgers-baselines")["image_auroc"]
        result["by_epsilon"][key] = {"rows": rows, "federated_per_site": per_site, "seconds": time.time() - t0}
        write_outputs(out, result_store(out, patients, result))
    return result


def result_store(out: Path, patients: int, result: dict) -> dict:
    path = out / "privacy_utility.json"
    store = json.loads(path.read_text()) if path.exists() else {}
    store.setdefault("sizes", {})[str(patients)] = result
    store["machine"] = f"{platform.machine()}, {platform.system()}, Python {platform.python_version()}"
    store["written"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    path.write_text(json.dumps(store, indent=2) + "\n")
    return store


def markdown(store: dict) -> str:
    lines = []
    for patients, res in store["sizes"].items():
        keys = list(res["by_epsilon"])
        sites = [k.removesuffix(" alone") for k in next(iter(res["by_epsilon"].values()))["rows"] if k.endswith(" alone")]
        lines.append(f"**{patients} patients per site** ({', '.join(map(str, res['train_patients']))} "
                     "training patients after the validation split); image AUROC on the pooled test set:\n")
        lines.append("| scorer | " + " | ".join("ε = ∞ (no DP)" if k == "inf" else f"ε = {k}" for k in keys) + " |")
        lines.append("|---|" + "---|" * len(keys))
        for name in row_names(sites):
            vals = [res["by_epsilon"][k]["rows"].get(name) for k in keys]
            lines.append(f"| {name} | " + " | ".join("–" if v is None else f"{v:.3f}" for v in vals) + " |")
        if res.get("zero_shot") is not None:
            lines.append("| public start, no site training (ε = 0) | "
                         + " | ".join(f"{res['zero_shot']:.3f}" for _ in keys) + " |")
        lines.append("| intensity threshold | " + " | ".join(f"{res['intensity']:.3f}" for _ in keys) + " |")
        lines.append("")
        lines.append("Federated model per site (its own test set) against the intensity threshold there:\n")
        lines.append("| site | intensity | public start | " + " | ".join("ε = ∞" if k == "inf" else f"ε = {k}"
                                                                      for k in keys) + " |")
        lines.append("|---|---|---|" + "---|" * len(keys))
        for site, base in res["intensity_per_site"].items():
            vals = [res["by_epsilon"][k]["federated_per_site"].get(site) for k in keys]
            zero = (res.get("zero_shot_per_site") or {}).get(site)
            lines.append(f"| {site} | {base:.3f} | {'–' if zero is None else f'{zero:.3f}'} | "
                         + " | ".join("–" if v is None else f"{v:.3f}" for v in vals) + " |")
        lines.append("")
    return "\n".join(lines)


def figure(store: dict) -> bytes:
    from medae_core.figures import _new_figure, _png

    sizes = list(store["sizes"].items())
    fig = _new_figure(5.2 * len(sizes), 3.8)
    for i, (patients, res) in enumerate(sizes):
        ax = fig.add_subplot(1, len(sizes), i + 1)
        keys = list(res["by_epsilon"])
        finite = [k for k in keys if k != "inf"]
        x = [float(k) for k in finite]
        names = next(iter(res["by_epsilon"].values()))["rows"]
        for name in names:
            style = {"federated": dict(lw=2.5, color="C0"), "centralized, DP": dict(lw=2, color="C1")}.get(
                name, dict(lw=1, ls="--", alpha=0.7))
            line, = ax.plot(x, [res["by_epsilon"][k]["rows"][name] for k in finite], marker="o", label=name, **style)
            if "inf" in keys:
                ax.axhline(res["by_epsilon"]["inf"]["rows"][name], color=line.get_color(), lw=0.8, ls=":")
        ax.axhline(res["intensity"], color="k", lw=1.5, ls="-.", label="intensity threshold")
        if res.get("zero_shot") is not None:
            ax.axhline(res["zero_shot"], color="C4", lw=1.5, ls="--", label="public start (ε = 0)")
        ax.axhline(0.5, color="grey", lw=0.8, label="chance")
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [f"{v:g}" for v in x])
        ax.set_xlabel("ε per site (δ = 1e-5, patient-level)")
        ax.set_ylabel("image AUROC (pooled test set)")
        ax.set_title(f"{patients} patients per site (dotted: no DP)")
        ax.set_ylim(0.3, 1.0)
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=7, loc="lower right")
    return _png(fig)


def write_outputs(out: Path, store: dict) -> None:
    from medae_core.figures import to_data_uri

    table = markdown(store)
    (out / "privacy_utility.md").write_text(table + "\n")
    png = figure(store)
    (out / "privacy_utility.png").write_bytes(png)
    body = "".join(f"<pre>{html.escape(block)}</pre>" for block in table.split("\n\n") if block.strip())
    (out / "report.html").write_text(
        "<!doctype html><html><head><meta charset=utf-8><title>medae privacy-utility</title>"
        "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto}img{max-width:100%}"
        "pre{background:#f6f8fa;padding:.6em;overflow:auto}</style></head><body>"
        "<h1>Privacy-utility trade-off (built-in benchmark)</h1>"
        f"<p>Machine: {html.escape(store['machine'])}; written {store['written']}. Every row sits next to the "
        "intensity-threshold baseline and the non-private run (ε = ∞).</p>"
        f'<img alt="privacy-utility curve" src="{to_data_uri(png)}">{body}</body></html>')


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/privacy-utility"))
    ap.add_argument("--patients", default=None, help="patients per site, comma list (default: the default size,40)")
    ap.add_argument("--epsilons", default="1,2,4,8,16,inf")
    ap.add_argument("--rounds", type=int, help="federated rounds (default: the configuration's)")
    ap.add_argument("--config", type=Path, help="run configuration (TOML); default: medae's defaults")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    base = RunConfig.load(args.config) if args.config else RunConfig()
    if args.rounds:
        base = base.with_overrides({"federation.rounds": args.rounds})
    sizes = [int(p) for p in (args.patients or f"{base.federation.benchmark_patients},40").split(",")]
    epsilons = [float(e) for e in args.epsilons.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    for patients in sizes:
        run_size(args.out, patients, epsilons, base)
    print((args.out / "privacy_utility.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
