"""``RUN/metrics.json`` and the self-contained ``RUN/report.html``.

The coordinator never sees a site's images, so the report's pictures of
reconstructions and anomaly maps use reference images that are public by
construction: slices synthesised from the MNI152 template (the built-in
benchmark's generator). Curves come from pooled histogram counts.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from medae_core.config import NOT_PRIVATE_AGAINST_COORDINATOR
from medae_core.fileio import write_json

PRIVACY_NOTE = (
    "ε bounds what the model weights reveal about any one {unit} of a site (DP-SGD, Opacus, {accountant} "
    "accountant, replayed from each site's append-only ledger; reported values are upper bounds). "
    "Evaluation replies — validation loss, score histogram counts and test metrics — are not covered by ε."
)


# Up to this many sites are named one by one in a round's line and the report's tables.
SITES_LISTED = 12


def round_summary(record: dict) -> str:
    parts = []
    if record.get("train_loss") is not None:
        parts.append(f"train loss {record['train_loss']:.4f}")
    if record.get("val_loss") is not None:
        parts.append(f"val loss {record['val_loss']:.4f}")
    spent = {n: s["epsilon"] for n, s in record["sites"].items() if s["status"] == "ok"}
    refused = [n for n, s in record["sites"].items() if s["status"] != "ok"]  # refused or rejected
    if len(spent) > SITES_LISTED:  # a large federation: the range, not a thousand names
        parts.append(f"{len(spent)} sites trained, ε {min(spent.values()):.2f}–{max(spent.values()):.2f}")
    elif spent:
        parts.append(", ".join(f"{n} ε={e:.2f}" for n, e in spent.items()))
    if len(refused) > SITES_LISTED:
        parts.append(f"refused: {len(refused)} sites ({', '.join(refused[:3])}, …)")
    elif refused:
        parts.append("refused: " + ", ".join(refused))
    auroc = (record.get("test") or {}).get("image_auroc")
    if auroc is not None:
        parts.append(f"image AUROC {auroc:.3f}")
    return "; ".join(parts)


def format_delta(delta: float) -> str:
    """δ as people write it: 1e-05, never 0.000."""
    return f"{delta:.0e}" if 0 < delta < 1e-3 else f"{delta:g}"


def write_metrics(run_dir: Path, metrics: dict[str, Any]) -> Path:
    return write_json(Path(run_dir) / "metrics.json", metrics)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v):
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 1000 else f"{v:.3g}"
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(png: bytes, alt: str) -> str:
    from medae_core import figures  # matplotlib: only when a report is drawn

    return f'<img alt="{html.escape(alt)}" src="{figures.to_data_uri(png)}">'


_IMG = re.compile(r'<img alt="([^"]*)" src="data:image/png;base64,([A-Za-z0-9+/=]+)">')


def report_figures(report: Path) -> list[tuple[str, bytes]]:
    """The figures of a written report, as (caption, PNG bytes): what `_img` embedded."""
    text = Path(report).read_text(encoding="utf-8")
    return [(html.unescape(alt), base64.b64decode(data)) for alt, data in _IMG.findall(text)]


RESULT_KEYS = ("image_auroc", "image_auprc", "sensitivity", "specificity", "pixel_auroc", "pixel_auprc",
               "dice_best", "dice_at_threshold")
# How each metric is named in every table and plot of a report.
LABELS = {
    "image_auroc": "image AUROC", "image_auprc": "image AUPRC", "sensitivity": "sensitivity at threshold",
    "specificity": "specificity at threshold", "pixel_auroc": "pixel AUROC", "pixel_auprc": "pixel AUPRC",
    "dice_best": "best Dice", "dice_at_threshold": "Dice at threshold", "baseline_image_auroc":
    "intensity baseline image AUROC",
}


def results_rows(metrics: dict[str, Any]) -> list[list[Any]]:
    rows = [["federated (pooled histograms)"] + [(metrics.get("test") or {}).get(k) for k in RESULT_KEYS]]
    if metrics.get("intensity_baseline") and "intensity threshold" not in (metrics.get("baselines") or {}):
        rows.append(["intensity threshold (pooled histograms)"]
                    + [metrics["intensity_baseline"].get(k) for k in RESULT_KEYS])
    for name, values in (metrics.get("baselines") or {}).items():
        rows.append([name] + [(values or {}).get(k) for k in RESULT_KEYS])
    return rows


def _hist_to_scores(pos: list[int], neg: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Expand label-split histogram counts into (bin index, label) pairs for curves."""
    bins = np.arange(len(pos))
    scores = np.concatenate([np.repeat(bins, pos), np.repeat(bins, neg)]).astype(float)
    labels = np.concatenate([np.ones(int(np.sum(pos))), np.zeros(int(np.sum(neg)))])
    return scores, labels


def reference_figures(bundle, reference) -> list[str]:
    """Reconstructions and anomaly maps of public reference slices (and VAE samples)."""
    import torch

    from medae_core import figures
    from medae_core import scoring

    images, masks = reference
    model = bundle.build_model()
    cond = None
    if model.conditional:  # the reference slices are of the model's first label
        cond = np.full(len(images), bundle.config.model.labels.index(reference_contrast(bundle.config)))
    recons, maps, scores = scoring.reconstruct_and_score(model, images, bundle.config.scoring, "cpu", 32, cond=cond)
    threshold = bundle.threshold.value if bundle.threshold is not None else None
    truth = ["lesion" if m is not None and m.any() else "healthy" for m in (masks if masks is not None
                                                                            else [None] * len(images))]
    decision = ["" if threshold is None else ("\n→ anomalous" if scoring.is_anomalous(s, threshold) else "\n→ normal")
                for s in scores]
    titles = [f"{t}\nscore {s:.3g}{d}" for t, s, d in zip(truth, scores, decision)]
    rows = [("input", list(images)), ("reconstruction", list(recons)),
            ("anomaly map", list(maps), "inferno")]
    if masks is not None:
        rows.append(("lesion mask", list(masks.astype(np.float32)), "gray"))
    out = [_img(figures.image_grid(rows, titles), "reconstructions and anomaly maps")]
    if bundle.config.model.kind == "vae":
        with torch.no_grad():
            samples = model.sample(8, generator=torch.Generator().manual_seed(0)).cpu().numpy()[:, 0]
        out.append(_img(figures.image_grid([("VAE samples", list(samples))]), "VAE samples"))
    return out


NEAR_CHANCE = 0.6  # image AUROC below this is reported as near chance
REFERENCE_NOT_COMPUTED = ("not computed: medae simulate trains it after the federation (unless --no-reference); "
                          "a deployed server cannot, as no image leaves a site")
REFERENCE_SWITCHED_OFF = ("not computed: switched off ([federation] reference = false, or --no-reference); "
                          "leave it on to see what privacy costs")
REFERENCE_AFTER_FAILURE = "not computed: no site trained, so there is no model to compare it with"


def _reference_note(metrics: dict[str, Any]) -> str:
    """Why a report has no non-private reference: the reason the run recorded, else the one its metrics show."""
    from medae_core.federated import run_failure

    if metrics.get("reference_not_computed"):
        return metrics["reference_not_computed"]
    if "rounds" in metrics and run_failure(metrics) is not None:
        return REFERENCE_AFTER_FAILURE
    if ((metrics.get("config") or {}).get("federation") or {}).get("reference") is False:
        return REFERENCE_SWITCHED_OFF
    return REFERENCE_NOT_COMPUTED


def verdict(metrics: dict[str, Any]) -> dict[str, Any]:
    """The first screen of a report: did the model learn, does it beat the baseline, what did it cost.

    ``warnings`` are the banners a reader must not miss (near chance, not
    better than the intensity threshold).
    """
    model = (metrics.get("test") or {}).get("image_auroc")
    baseline = (metrics.get("intensity_baseline") or {}).get("image_auroc")
    baselines = metrics.get("baselines") or {}
    if baseline is None:
        baseline = (baselines.get("intensity threshold") or {}).get("image_auroc")
    reference = (baselines.get("centralized, no DP") or {}).get("image_auroc")
    eps = [s.get("epsilon") for s in metrics.get("sites", []) if s.get("epsilon") is not None]
    warnings = []
    if model is not None and model < NEAR_CHANCE:
        warnings.append(f"The model is near chance (image AUROC {model:.3f}; 0.5 is a coin toss): "
                        "it has not learned to find anomalies.")
    if model is not None and baseline is not None and model <= baseline:
        warnings.append(f"The model does not beat the plain intensity threshold (image AUROC {model:.3f} vs "
                        f"{baseline:.3f}): for these lesions, thresholding the image is as good.")
    if ((metrics.get("config") or {}).get("privacy") or {}).get("reproducible_noise"):
        warnings.append(NOT_PRIVATE_AGAINST_COORDINATOR + ".")
    return {"model": model, "baseline": baseline, "reference": reference,
            "reference_note": _reference_note(metrics),
            "epsilon": max(eps) if eps else None, "warnings": warnings}


def _privacy_cost(model: float, reference: float | None, private: bool) -> str:
    """The banner's clause on the non-private reference: what privacy (and federation) cost, or that it cost nothing."""
    if reference is None:
        return ""
    what = "privacy and federation cost" if private else "federation cost"
    if model < reference:
        return f"; {what} {reference - model:.3f} against the non-private reference's {reference:.3f}"
    return f"; at or above the non-private reference's {reference:.3f}"


def _summary_html(metrics: dict[str, Any], cfg) -> str:
    v = verdict(metrics)

    def num(x):
        return "–" if x is None else f"{x:.3f}"

    init = metrics.get("init")
    start = (f"Started from a public model ({html.escape(str(init.get('data', '')))}; "
             f"config {html.escape(str(init.get('config_hash', '?')))})" if init
             else "Started from a random initialisation (no public pretraining)")
    ref = num(v["reference"]) if v["reference"] is not None else html.escape(v["reference_note"])
    cost = (f"ε = {v['epsilon']:.2f} of {cfg.privacy.budget_epsilon:g} per site (δ = {format_delta(cfg.privacy.delta)}, "
            f"per {cfg.privacy.unit})" if cfg.privacy.enabled and v["epsilon"] is not None
            else "no differential privacy" if not cfg.privacy.enabled else "–")
    rows = [["this model (pooled over sites)", num(v["model"])],
            ["intensity-threshold baseline", num(v["baseline"])],
            ["non-private reference (centralized, no DP)", ref],
            ["privacy spent", cost]]
    banners = "".join(f"<p class=alert>{html.escape(w)}</p>" for w in v["warnings"])
    if v["model"] is not None and not v["warnings"]:
        banners = (f"<p class=ok>The model learned: image AUROC {v['model']:.3f}"
                   + (f", above the intensity threshold's {v['baseline']:.3f}" if v["baseline"] is not None else "")
                   + _privacy_cost(v["model"], v["reference"], cfg.privacy.enabled) + ".</p>")
    return ("<h2>At a glance</h2>" + banners
            + _table(["", "image AUROC / cost"], rows) + f"<p class=note>{html.escape(start)}.</p>")


def write_report(run_dir: Path, metrics: dict[str, Any], bundle, reference=None) -> Path:
    """Write ``RUN/report.html``; ``reference`` = (images, masks) of public slices."""
    from medae_core import figures
    cfg = bundle.config
    rounds = metrics.get("rounds", [])
    sections = [_summary_html(metrics, cfg)]

    loss = {
        "train loss": [(r["round"], r["train_loss"]) for r in rounds if r.get("train_loss") is not None],
        "validation loss": [(r["round"], r["val_loss"]) for r in rounds if r.get("val_loss") is not None],
    }
    eps: dict[str, list] = {}
    for r in rounds:
        for site, s in r.get("sites", {}).items():
            if s.get("status") == "ok":
                eps.setdefault(site, []).append((r["round"], s["epsilon"]))
    evaluated = [r for r in rounds if r.get("test")]  # federation.evaluate_every may skip rounds
    auroc = {
        "this model": [(r["round"], r["test"].get("image_auroc")) for r in evaluated],
        "intensity baseline": [(r["round"], (r.get("baseline") or {}).get("image_auroc")) for r in evaluated],
    }
    plots = []
    if any(loss.values()):
        plots.append(_img(figures.line_figure(loss, "round", "loss", "Loss per round", integer_x=True),
                          "loss per round"))
    if any(y is not None for _, y in auroc["this model"]):
        plots.append(_img(figures.line_figure(auroc, "round", "image AUROC", "Image AUROC per round (pooled)",
                                              integer_x=True, hlines={"chance": 0.5}), "AUROC per round"))
    if len(eps) > SITES_LISTED:  # a line per site would be a smear: the spread over sites instead
        by_round: dict[int, list[float]] = {}
        for points in eps.values():
            for rnd, e in points:
                by_round.setdefault(rnd, []).append(e)
        eps = {f"{name} over {len(eps)} sites": [(rnd, pick(v)) for rnd, v in sorted(by_round.items())]
               for name, pick in (("most", max), ("median", lambda v: float(np.median(v))), ("least", min))}
    if eps and cfg.privacy.enabled:
        plots.append(_img(figures.line_figure(eps, "round", "ε spent", "Privacy spent per site", integer_x=True,
                                              hlines={f"budget ε = {cfg.privacy.budget_epsilon:g}":
                                                      cfg.privacy.budget_epsilon}), "epsilon per site"))
    sections.append("<h2>Training</h2>" + "".join(plots))

    site_rows, metric_rows = [], []
    last_sites = {}
    for r in rounds:
        last_sites.update({n: v for n, v in r.get("sites", {}).items() if v.get("status") == "ok"})
    for s in metrics.get("sites", []):
        t = s.get("test") or {}
        trained = last_sites.get(s["site"], {})
        site_rows.append([s["site"], s["num_examples"], s["epsilon"] if cfg.privacy.enabled else None,
                          format_delta(s["delta"]), s["budget_epsilon"], s["privacy_unit"],
                          trained.get("trained_parameters"), trained.get("noise_to_signal")])
        metric_rows.append([s["site"], t.get("image_auroc"), t.get("baseline_image_auroc"),
                            *(t.get(k) for k in RESULT_KEYS[1:])])
    refusals = [[r["round"], site, s.get("reason")] for r in rounds for site, s in r.get("sites", {}).items()
                if s.get("status") != "ok"]
    site_header = ["site", "images / round", "ε", "δ", "ε budget", "privacy unit", "trained parameters",
                   "noise / signal"]
    metric_header = ["site (own test images)", LABELS["image_auroc"], LABELS["baseline_image_auroc"],
                     *(LABELS[k] for k in RESULT_KEYS[1:])]
    every_site = _table(site_header, site_rows) + _table(metric_header, metric_rows)
    if len(site_rows) > SITES_LISTED:  # a large federation: the spread first, every site on request
        every_site = (_spread_table(site_header, site_rows, metric_header, metric_rows)
                      + f"<details><summary>every site ({len(site_rows)})</summary>{every_site}</details>")
    refused_table = _table(["round", "site", "reason"], refusals)
    if len(refusals) > SITES_LISTED:
        refused_table = f"<details><summary>{len(refusals)} refusals and rejections</summary>{refused_table}</details>"
    sections.append(
        "<h2>Sites</h2>"
        + every_site
        + "<p class=note>noise / signal: norm of the DP noise on a site's run-averaged update in units of the "
          "clipped signal (σ·√d / (B·√T)); above 1 only a small move from the starting point survives it.</p>"
        + (("<h3>Refused rounds and rejected updates</h3>" + refused_table) if refusals else "")
    )

    results = "<h2>Test results</h2>" + _table(["scorer", *(LABELS[k] for k in RESULT_KEYS)], results_rows(metrics))
    last = rounds[-1] if rounds else {}
    curves = (last.get("final") or {}).get("curves") or last.get("curves")
    if curves:
        from medae_core.scoring import SCORE_BINS

        plotted = {"this model": _hist_to_scores(curves["image_pos"], curves["image_neg"])}
        if curves.get("baseline_pos") is not None:
            plotted["intensity threshold"] = _hist_to_scores(curves["baseline_pos"], curves["baseline_neg"])
        results += _img(figures.roc_pr_figure(
            plotted, title="Image-level ROC and precision-recall (pooled over sites)"), "ROC and PR curves")
        results += _img(figures.score_histogram_figure(
            SCORE_BINS, curves["image_neg"], curves["image_pos"], metrics.get("threshold"),
            title="Image scores of healthy and anomalous test images (pooled)"), "score histograms")
    sections.append(results)
    if reference is not None:
        sections.append("<h2>Reconstructions and anomaly maps (synthetic reference slices)</h2>"
                        + "".join(reference_figures(bundle, reference)))

    threshold = metrics.get("threshold")
    header = (
        f"<h1>medae run {html.escape(str(metrics.get('run_id', '')))}</h1>"
        f"<p>{len(rounds)} rounds · strategy {cfg.federation.strategy} · model {cfg.model.kind} "
        f"{cfg.model.image_size}px · threshold {'–' if threshold is None else f'{threshold:.4g}'} "
        f"({cfg.scoring.threshold_percentile:g}th percentile of pooled healthy validation scores) · "
        f"written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}</p>"
        + (f"<p class=note>{html.escape(PRIVACY_NOTE.format(unit=cfg.privacy.unit, accountant=cfg.privacy.accountant))}</p>"
           if cfg.privacy.enabled else "<p class=warn>Trained without differential privacy.</p>")
    )
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "th:first-child,td:first-child{text-align:left}img{max-width:100%;display:block;margin:1em 0}"
        ".note{background:#eef6ff;padding:.6em}.warn{background:#fff3cd;padding:.6em}"
        ".alert{background:#f8d7da;border-left:6px solid #b02a37;padding:.6em;font-weight:600}"
        ".ok{background:#d1e7dd;border-left:6px solid #146c43;padding:.6em}"
    )
    page = (f"<!doctype html><html><head><meta charset=utf-8><title>medae report</title><style>{style}</style>"
            f"</head><body>{header}{''.join(sections)}</body></html>")
    path = Path(run_dir) / "report.html"
    path.write_text(page)
    return path


def _spread_table(site_header: list[str], site_rows: list[list], metric_header: list[str],
                  metric_rows: list[list]) -> str:
    """Each numeric per-site column as its spread over sites: least, quartiles, most, and how many sites have it."""
    rows = []
    for header, table in ((site_header, site_rows), (metric_header, metric_rows)):
        for j, name in enumerate(header[1:], start=1):
            values = np.array([r[j] for r in table if isinstance(r[j], int | float) and not isinstance(r[j], bool)],
                              dtype=float)
            if values.size:
                rows.append([name, *np.quantile(values, [0.0, 0.25, 0.5, 0.75, 1.0]), values.size])
    model = {r[0]: r[1] for r in metric_rows if isinstance(r[1], int | float)}
    base = {r[0]: r[2] for r in metric_rows if isinstance(r[2], int | float)}
    both = [site for site in model if site in base]
    beats = (f"<p>{sum(model[s] > base[s] for s in both)} of {len(both)} sites with test labels score a higher "
             f"image AUROC on their own test images than their intensity-threshold baseline.</p>") if both else ""
    return (f"<p>{len(site_rows)} sites: each row is one per-site number's spread over the sites.</p>"
            + _table(["per site", "least", "25%", "median", "75%", "most", "sites"], rows) + beats)


def reference_contrast(cfg) -> str:
    """The contrast of the report's reference slices: the first the run reads, else T1."""
    return cfg.data.contrasts[0] if cfg.data.contrasts else "t1"


def reference_images(cfg, n: int = 6, seed: int = 12345):
    """Public reference slices (synthesised from the MNI152 template) for report figures.

    Returns (images, masks) at the run's image size and preprocessing: half of
    them with lesions, half healthy; in the first contrast the run reads (T1 when it
    reads every image; None when the benchmark has no such contrast).
    """
    import tempfile

    from medae_core.benchmark import CONTRASTS, make_benchmark
    from medae_core.data import load_site

    contrast = reference_contrast(cfg)
    if contrast not in CONTRASTS:
        return None
    with tempfile.TemporaryDirectory(prefix="medae-reference-") as tmp:
        root = Path(tmp) / "ref"
        make_benchmark(root, sites=1, patients=3, seed=seed, slices_per_patient=10, contrasts=(contrast,))
        site = load_site(next(p for p in root.iterdir() if p.is_dir()), dataclasses.replace(cfg.data, cache=False),
                         cfg.model.image_size)  # synthetic slices: nothing to keep
    test = site.test
    if test is None or test.labels is None:
        return None
    lesion = np.flatnonzero(test.labels == 1)[: n // 2]
    healthy = np.flatnonzero(test.labels == 0)[: n - len(lesion)]
    idx = np.concatenate([lesion, healthy])
    masks = test.masks[idx] if test.masks is not None else None
    return test.images[idx], masks
