"""The `medae` command: its subcommands and their parser.

Every subcommand builds one `RunConfig` — defaults, then ``--config FILE``,
then explicit options — and passes it on unchanged. What it shows (consoles,
progress, tables) is in `medae.console`. About 600 lines, on purpose: each
command's handler and its options stay in one file, so that the help, the
examples and what runs are read and tested together (`build_parser`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Sites are offline and medae never phones home: Flower's telemetry is read at
# import time, so it is switched off before anything imports flwr.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: E402
from rich.table import Table  # noqa: E402
from rich.text import Text  # noqa: E402

from medae.console import (  # noqa: E402
    check_data_tables,
    configure_logging,
    console,
    flower_echo,
    follow_simulation,
    out,
    print_json,
    progress_bar,
    quiet_flower,
    results_table,
)
from medae.deploy import DEFAULT_PORT  # noqa: E402
from medae_core.config import IMAGE_SIZES, MODEL_KINDS, RunConfig  # noqa: E402
from medae_core.errors import MedaeError  # noqa: E402

# -- helpers ------------------------------------------------------------------------
def load_config(args, overrides: dict) -> RunConfig:
    cfg = RunConfig.load(args.config) if getattr(args, "config", None) else RunConfig()
    cfg = cfg.with_overrides(overrides)
    init = cfg.train.init.strip()
    if init and init.lower() not in ("builtin", "none", "scratch"):
        # Flower's app processes run elsewhere: hand them an absolute path.
        cfg = cfg.with_overrides({"train.init": str(Path(init).expanduser().resolve())})
    return cfg


def add_config_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path,
                   help="run configuration (TOML; configs/default.toml lists every key) (default: medae's defaults)")


def add_device_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help='cpu, cuda or cuda:N (default: train.device = "auto": CUDA when present, '
                                    "else CPU)")


# -- check-data ---------------------------------------------------------------------
def cmd_check_data(args) -> int:
    from medae_core.data import check_data

    cfg = load_config(args, {})
    with progress_bar("reading images") as progress:
        report = check_data(args.path, cfg.data, cfg.model.image_size, progress=progress)
    if args.json:
        print_json(report)
    else:
        out.print(check_data_tables(report))
        if report["skipped"]:
            out.print("--json lists every skipped file with its reason", style="dim")
    return 0 if report["usable_images"] >= 1 else 1


# -- make-benchmark -----------------------------------------------------------------
def cmd_make_benchmark(args) -> int:
    from medae_core.benchmark import make_benchmark

    with progress_bar("synthesising patients") as progress:
        summary = make_benchmark(args.out, sites=args.sites, patients=args.patients, seed=args.seed,
                                 test_patients=args.test_patients, public=args.public, progress=progress,
                                 contrasts=tuple(c.strip() for c in args.contrasts.split(",") if c.strip()))
    table = Table(title=f"benchmark written to {args.out}")
    for col in ("site", "train patients", "test patients", "train slices", "test slices", "anomalous"):
        table.add_column(col)
    for site in summary["sites"]:
        table.add_row(site["name"], str(site["train"]["patients"]), str(site["test"]["patients"]),
                      str(site["train"]["slices"]), str(site["test"]["slices"]), str(site["test"]["anomalous_slices"]))
    if "public" in summary:
        pub = summary["public"]
        table.add_row("public", str(pub["patients"]), "–", str(pub["slices"]), "–", "–")
    out.print(table)
    if "public" in summary:
        out.print(f"public set (healthy, for `medae pretrain`): {Path(args.out) / 'public'}")
    return 0


# -- pretrain -----------------------------------------------------------------------
def cmd_pretrain(args) -> int:
    from medae_core.pretrain import pretrain

    cfg = load_config(args, {
        "model.kind": args.model,
        "model.image_size": args.image_size,
        "train.epochs": args.epochs,
        "train.device": args.device,
    })
    with progress_bar(f"pretraining {cfg.model.kind} on public data (no DP)") as progress:
        summary = pretrain(args.data, args.out, cfg, description=args.description, progress=progress)
    table = Table(title=f"public model → {args.out}", show_header=False)
    table.add_row("data", summary["data"])
    table.add_row("patients / images", f"{summary['patients']} / {summary['images']}")
    table.add_row("loss (train / val)", f"{summary['loss']:.4f} / {summary['val_loss']:.4f}")
    table.add_row("privacy", "none: pretraining data must be public (no site's patients)")
    out.print(table)
    out.print(f'start a run from it: train.init = "{args.out}" in a config file, or --init {args.out}')
    return 0


# -- train-local --------------------------------------------------------------------
def cmd_train_local(args) -> int:
    from medae_core.jobs import train_local

    cfg = load_config(args, {
        "model.kind": args.model,
        "train.epochs": args.epochs,
        "model.image_size": args.image_size,
        "train.device": args.device,
        "privacy.enabled": False if args.no_dp else None,
        "privacy.budget_epsilon": args.budget,
        "train.init": args.init,
    })
    with progress_bar(f"training {cfg.model.kind}") as progress:
        summary = train_local(args.data, args.out, cfg, ledger_path=args.ledger, progress=progress)
    table = Table(title=f"trained on {summary['site']} → {args.out}", show_header=False)
    table.add_row("images / patients", f"{summary['train_images']} / {summary['train_patients']}")
    table.add_row("loss (train / val)", f"{summary['loss']:.4f} / {summary['val_loss']:.4f}")
    table.add_row("speed", f"{summary['images_per_second']:.0f} images/s")
    init = summary.get("init")
    table.add_row("start", f"public model: {init['data']}" if init else "random initialisation")
    table.add_row("trained parameters", str(summary.get("trained_parameters", "–")))
    priv = summary["privacy"]
    if priv["enabled"]:
        table.add_row("privacy", f"ε = {priv['epsilon']:.2f} of {priv['budget_epsilon']:g} (δ = {priv['delta']:g}), "
                                 f"unit: {priv['unit']}, σ = {priv['noise_multiplier']:.3f}")
        table.add_row("ledger", priv["ledger"])
    else:
        table.add_row("privacy", Text("none (--no-dp): this model carries no privacy guarantee", style="yellow"))
    table.add_row("threshold", f"{summary['threshold']['value']:.4g} "
                               f"({summary['threshold']['percentile']:g}th percentile of healthy validation)")
    out.print(table)
    if priv.get("reproducible_noise"):
        from medae_core.config import NOT_PRIVATE_AGAINST_COORDINATOR

        out.print(NOT_PRIVATE_AGAINST_COORDINATOR, style="bold red", soft_wrap=True)
    if "test" in summary:
        out.print(results_table({"model": summary["test"], "intensity baseline": summary["baseline_intensity"]}))
        if priv["enabled"]:
            out.print("non-private reference: not computed here; the same command with --no-dp trains one on this site",
                      soft_wrap=True)
    return 0


# -- score --------------------------------------------------------------------------
def cmd_score(args) -> int:
    from medae_core.jobs import score_folder

    with progress_bar("scoring") as progress:
        summary = score_folder(args.model, args.input, args.out, device=args.device,
                               heatmaps=not args.no_heatmaps, progress=progress)
    msg = f"scored {summary['images']} images → {Path(args.out) / 'scores.csv'}"
    if summary["anomalous"] is not None:
        msg += f"; {summary['anomalous']} above the threshold {summary['threshold']:.4g}"
    out.print(msg)
    if summary["skipped"]:
        out.print(f"{len(summary['skipped'])} files skipped (reasons in summary.json)", style="yellow")
    for warning in summary.get("warnings", []):
        out.print(Text.assemble(("warning: ", "bold yellow"), warning), soft_wrap=True)
    if "metrics" in summary:
        out.print(results_table({"model": summary["metrics"], "intensity baseline": summary["baseline_intensity"]}))
        out.print("non-private reference: a training run's (medae simulate's report, or train-local --no-dp), "
                  "not computed when scoring", soft_wrap=True)
    return 0


# -- encode, decode, sample ---------------------------------------------------------
def cmd_denoise(args) -> int:
    from medae_core.denoise import denoise_folder

    with progress_bar("denoising") as progress:
        summary = denoise_folder(args.model, args.input, args.out, device=args.device, progress=progress)
    out.print(f"wrote {summary['files_written']} denoised files → {args.out}")
    if summary["skipped"]:
        out.print(f"{len(summary['skipped'])} files skipped (reasons in summary.json)", style="yellow")
    return 0


def cmd_translate(args) -> int:
    from medae_core.denoise import translate_folder

    with progress_bar(f"translating to {args.to}") as progress:
        summary = translate_folder(args.model, args.input, args.out, args.to, device=args.device, progress=progress)
    out.print(f"wrote {summary['files_written']} synthetic {args.to} files → {args.out}")
    out.print("synthetic images: not acquired, not for diagnosis (their DICOM ImageComments say so)", style="yellow")
    if summary["skipped"]:
        out.print(f"{len(summary['skipped'])} files skipped (reasons in summary.json)", style="yellow")
    return 0


def cmd_encode(args) -> int:
    from medae_core.latent import encode_folder

    with progress_bar("encoding") as progress:
        summary = encode_folder(args.model, args.input, args.out, device=args.device, progress=progress)
    out.print(f"encoded {summary['images']} images into {summary['latent_dim']}-dimensional codes → "
              f"{Path(args.out) / 'codes.npz'} (rows in manifest.csv)")
    if summary["skipped"]:
        out.print(f"{len(summary['skipped'])} files skipped (reasons in summary.json)", style="yellow")
    return 0


def cmd_decode(args) -> int:
    from medae_core.latent import decode_codes

    with progress_bar("decoding") as progress:
        summary = decode_codes(args.model, args.codes, args.out, device=args.device, progress=progress)
    out.print(f"decoded {summary['images']} codes → {args.out}")
    if not summary["codes_from_this_model"]:
        out.print("these codes were not encoded by this model (another model hash): the images show what this "
                  "model makes of them", style="yellow", soft_wrap=True)
    return 0


def cmd_sample(args) -> int:
    from medae_core.latent import sample_images

    summary = sample_images(args.model, args.n, args.out, seed=args.seed, fmt=args.format, device=args.device,
                            label=args.label)
    out.print(f"generated {summary['images']} synthetic images ({summary['format']}, seed {summary['seed']}) → "
              f"{args.out}; {summary['privacy']}")
    return 0


# -- simulate -----------------------------------------------------------------------
def cmd_simulate(args) -> int:
    from medae.simulate import prepare_and_run

    cfg = load_config(args, {
        "federation.data_root": str(args.data) if args.data else None,
        "federation.sites": args.sites,
        "federation.rounds": args.rounds,
        "model.kind": args.model,
        "model.image_size": args.image_size,
        "train.device": args.device,
        "train.init": args.init,
        "privacy.enabled": False if args.no_dp else None,
        "federation.reference": False if args.no_reference else None,
    })
    quiet_flower(args.verbose)
    with follow_simulation(Path(args.out), cfg):
        metrics = prepare_and_run(cfg, args.out, baselines=args.baselines)
    rows = {"federated": metrics.get("test")}
    if metrics.get("intensity_baseline") and not metrics.get("baselines"):
        rows["intensity threshold"] = metrics["intensity_baseline"]
    rows.update({k: v for k, v in (metrics.get("baselines") or {}).items()})
    out.print(results_table(rows))
    from medae_core.report import verdict

    seen = verdict(metrics)
    if seen["reference"] is None:
        out.print(f"non-private reference: {seen['reference_note']}", soft_wrap=True)

    for warning in seen["warnings"]:
        out.print(warning, style="bold red", soft_wrap=True)
    out.print(f"report: {Path(args.out) / 'report.html'}; model: {Path(args.out) / 'model'}")
    return _exit_if_untrained(metrics)


def _exit_if_untrained(metrics: dict) -> int:
    from medae_core.federated import run_failure

    why = run_failure(metrics)
    if why is None:
        return 0
    console.print(Text.assemble(("error: ", "bold red"), f"{why}. The model is the untrained start; "
                                "the report shows it only for reference."), soft_wrap=True)
    return 1


# -- privacy ------------------------------------------------------------------------
def cmd_cache(args) -> int:
    from medae_core.data import cache as image_cache

    root = image_cache.cache_dir()
    if args.clear:
        removed = image_cache.clear(root)
        out.print(f"image cache {root}: {removed} entries deleted")
        return 0
    entries, size = image_cache.usage(root)
    out.print(f"image cache {root}: {entries} files' decoded slices, {size / 2**20:.1f} MiB "
              f"(used where [data] cache = true; `medae cache --clear` empties it)")
    return 0


def cmd_privacy_epsilon(args) -> int:
    from medae_core.privacy import compute_epsilon

    eps = compute_epsilon([(args.noise_multiplier, args.sample_rate, args.steps)], args.delta, args.accountant)
    if args.json:
        print_json({"epsilon": eps})
    else:
        out.print(f"ε = {eps:.4f} (δ = {args.delta:g}, {args.accountant} accountant)")
    return 0


def cmd_privacy_ledger(args) -> int:
    from medae_core.privacy import PrivacyLedger, describe

    summary = describe(PrivacyLedger.open(args.path, readonly=True))
    if args.json:
        print_json(summary)
        return 0
    table = Table(title=f"privacy ledger {args.path}", show_header=False)
    for key, value in summary.items():
        if key != "entries":
            table.add_row(key, str(value))
    out.print(table)
    entries = Table(title="entries")
    for col in ("seq", "time", "run_id", "round", "noise_multiplier", "sample_rate", "steps", "unit"):
        entries.add_column(col)
    for e in summary.get("entries", []):
        entries.add_row(*(str(e.get(c, "")) for c in ("seq", "time", "run_id", "round", "noise_multiplier",
                                                     "sample_rate", "steps", "unit")))
    out.print(entries)
    return 0


def cmd_privacy_reset(args) -> int:
    from medae_core.privacy import PrivacyLedger

    if not args.yes:
        console.print("refusing: resetting a ledger forgets privacy already spent. "
                      "Pass --yes if an administrator has verified this.", style="red")
        return 2
    result = PrivacyLedger.reset(args.path, confirm=True)
    out.print(f"ledger moved aside to {result['moved']}")
    if result.get("carried_over"):
        out.print(f"{result['carried_over']} verified entries (ε = {result['epsilon_carried_over']:.3f}) "
                  f"carried over into the new ledger at {result['path']}")
    else:
        out.print("nothing could be verified and carried over: the site starts a new ledger on its next round")
    return 0


def cmd_privacy_set_budget(args) -> int:
    from medae_core.privacy import PrivacyLedger

    if not args.yes:
        console.print("refusing: changing a site's committed budget needs --yes and a --reason", style="red")
        return 2
    ledger = PrivacyLedger.open(args.path)
    ledger.set_budget(args.epsilon, confirm=True, reason=args.reason)
    out.print(f"budget of {ledger.site} set to ε = {args.epsilon:g} (spent so far: {ledger.epsilon():.3f})")
    return 0


# -- certs and keys -----------------------------------------------------------------
def cmd_certs(args) -> int:
    from medae.pki import make_certs

    paths = make_certs(args.out, args.server_name)
    out.print(f"CA and server certificate for {', '.join(args.server_name)} written to {args.out}")
    out.print(f"  give every site: {paths['ca_cert']}")
    out.print(f"  keep on the server: {paths['server_cert']}, {paths['server_key']} (owner-only)")
    out.print(f"  keep offline: {paths['ca_key']} (owner-only)")
    return 0


def cmd_keys(args) -> int:
    from medae.pki import make_site_key

    paths = make_site_key(args.out, args.site)
    out.print(f"key pair for site {args.site}: keep {paths['private']} at the site (owner-only); "
              f"send {paths['public']} to the coordinator to authorize it")
    return 0


# -- server and client (deployment) -------------------------------------------------
def _insecure_warning(args) -> None:
    if args.insecure:
        from medae.deploy import INSECURE_WARNING

        console.print(Text.assemble(("WARNING ", "bold red"), INSECURE_WARNING), soft_wrap=True, highlight=False)


def cmd_server(args) -> int:
    from medae.deploy import ServerOptions, serve
    from medae_core.report import round_summary

    _insecure_warning(args)
    cfg = load_config(args, {"federation.rounds": args.rounds, "model.kind": args.model, "train.init": args.init,
                             "privacy.enabled": False if args.no_dp else None})
    opts = ServerOptions(run_dir=args.out, certs=args.certs, authorized_keys=args.authorized_keys,
                         host=args.host, port=args.port, internal_port=args.internal_port, insecure=args.insecure)
    rounds = cfg.federation.rounds
    quiet_flower(args.verbose)
    with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=False) as progress:
        task = progress.add_task("waiting for sites", total=rounds)

        def on_round(done: int, total: int, record: dict | None) -> None:
            progress.update(task, completed=done, description=f"round {done}/{total}")
            if record:
                progress.console.print(f"round {record['round']}/{total}: {round_summary(record)}", highlight=False)

        metrics = serve(cfg, opts, progress=on_round, echo=flower_echo(args.verbose))
    out.print(results_table({"federated": metrics.get("test"),
                             "intensity threshold": metrics.get("intensity_baseline")}))
    from medae_core.report import REFERENCE_NOT_COMPUTED

    out.print(f"non-private reference: {REFERENCE_NOT_COMPUTED}", soft_wrap=True)
    out.print(f"report: {args.out / 'report.html'}; model: {args.out / 'model'}")
    return _exit_if_untrained(metrics)


def cmd_client(args) -> int:
    from medae.deploy import ClientOptions, join
    from medae_core.privacy import medae_home

    _insecure_warning(args)
    cfg = load_config(args, {"privacy.budget_epsilon": args.budget, "train.device": args.device})
    opts = ClientOptions(server=args.server, data=args.data, ca=args.ca, key=args.key, site_name=args.site_name,
                         ledger=args.ledger, insecure=args.insecure, allow_no_dp=args.allow_no_dp,
                         runtime_port=args.runtime_port, max_wait_s=args.max_wait, once=args.once,
                         approved_fabs=args.approved_fabs, image_cache=args.image_cache)

    def on_start(site: str, ledger, report: dict) -> None:
        parts = report["parts"]
        line = f"site {site}: {parts['train']['usable_images']} training images"
        if "test" in parts:
            line += f", {parts['test']['usable_images']} test images"
        if report["skipped"]:
            line += f" ({len(report['skipped'])} files skipped; `medae check-data` lists why)"
        out.print(line, highlight=False)
        if ledger.exists():
            from medae_core.privacy import PrivacyLedger

            book = PrivacyLedger.open(ledger)
            out.print(f"privacy ledger {ledger}: ε {book.epsilon():.3f} spent of {book.budget_epsilon:g}",
                      highlight=False)
        out.print(f"joining {args.server}; only outbound connections; Ctrl-C to leave", highlight=False)

    rc = join(cfg, opts, home=medae_home(), echo=flower_echo(args.verbose), on_start=on_start)
    out.print("the SuperNode stopped" + ("" if rc == 0 else f" (exit code {rc})"))
    return rc


# -- parser -------------------------------------------------------------------------
# Options that override a config key: their help shows that key's default (RunConfig()).
CONFIG_OPTIONS = {
    "sites": "federation.sites", "rounds": "federation.rounds", "model": "model.kind",
    "image_size": "model.image_size", "epochs": "train.epochs", "budget": "privacy.budget_epsilon",
    "device": "train.device", "init": "train.init",
}


def _config_default(key: str) -> str:
    section, _, name = key.partition(".")
    return f"{key} = {RunConfig().to_dict()[section][name]!r}"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default: the value, the config key it overrides, or "off"."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or isinstance(action, argparse._HelpAction) or action.default is argparse.SUPPRESS:
            return text
        if action.required or not action.option_strings:
            return f"{text} (required)"
        if isinstance(action, argparse._StoreTrueAction):
            return f"{text} (default: off)"
        if action.default is None and action.dest in CONFIG_OPTIONS:
            return f"{text} (default: {_config_default(CONFIG_OPTIONS[action.dest])}, or --config's)"
        if action.default is None:
            return f"{text} (default: none)"
        return f"{text} (default: %(default)s)"


def _command(sub, name: str, help: str, example: str, func) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".",
                       epilog=f"example:\n  {example}", formatter_class=HelpFormatter)
    p.set_defaults(func=func)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medae",
        description="Federated autoencoder / VAE anomaly detection for medical images, with differential privacy.",
        epilog="example (the quick start):\n  medae simulate --out runs/simulate\n"
               "`medae COMMAND --help` shows each command's options and defaults.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _command(sub, "check-data", "summarise usable images and skipped files in a folder",
                 "medae check-data /data/hospital-a", cmd_check_data)
    p.add_argument("path", type=Path, help="a site folder (SITE/train, SITE/test) or any folder of images")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout, with every skipped file")
    add_config_option(p)

    p = _command(sub, "cache", "where the image cache is and its size, or empty it ([data] cache = true)",
                 "medae cache --clear", cmd_cache)
    p.add_argument("--clear", action="store_true", help="delete every cached image (only the cache's own files)")

    p = _command(sub, "make-benchmark", "write the built-in synthetic brain-MRI benchmark as DICOM",
                 "medae make-benchmark --out data/bench --sites 3 --patients 165 --public 200", cmd_make_benchmark)
    p.add_argument("--out", type=Path, required=True, help="folder to write (one subfolder per site)")
    p.add_argument("--sites", type=int, default=3, help="number of sites")
    p.add_argument("--patients", type=int, default=24, help="patients per site (healthy training + test)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the anatomy, scanners and lesions")
    p.add_argument("--test-patients", type=int, help="test patients per site (default: a third of --patients)")
    p.add_argument("--public", type=int, default=0, metavar="N",
                   help="also write DIR/public/: N healthy patients from scanners no site uses, for `medae pretrain`")
    p.add_argument("--contrasts", default="t1", metavar="LIST",
                   help="the sites' contrasts, from t1, t2, flair (e.g. t1,t2,flair): every patient in each, "
                        "same anatomy and lesions, one DICOM series per contrast (PATIENT/<contrast>/)")

    p = _command(sub, "pretrain", "train a model WITHOUT DP on public data, as the start of private runs",
                 "medae pretrain --data data/bench/public --out models/public-ae", cmd_pretrain)
    p.add_argument("--data", type=Path, required=True,
                   help="public images only (e.g. make-benchmark's DIR/public, IXI, OASIS): no site's patients")
    p.add_argument("--out", type=Path, required=True, help="bundle folder to write")
    p.add_argument("--model", choices=MODEL_KINDS, help="model kind")
    p.add_argument("--epochs", type=int, default=30, help="epochs")
    p.add_argument("--image-size", type=int, choices=IMAGE_SIZES, help="image size in pixels")
    p.add_argument("--description", help="what the data is, recorded in the bundle (default: from the folder)")
    add_config_option(p)
    add_device_option(p)

    p = _command(sub, "train-local", "train on one site (DP by default) and write a model bundle",
                 "medae train-local --data /data/hospital-a --out runs/hospital-a", cmd_train_local)
    p.add_argument("--data", type=Path, required=True, help="site folder (SITE/train, optional SITE/test)")
    p.add_argument("--out", type=Path, required=True, help="run folder to write")
    p.add_argument("--model", choices=MODEL_KINDS, help="model kind")
    p.add_argument("--epochs", type=int, help="training epochs")
    p.add_argument("--image-size", type=int, choices=IMAGE_SIZES, help="image size in pixels")
    p.add_argument("--no-dp", action="store_true", help="train without differential privacy")
    p.add_argument("--budget", type=float, help="the site's total ε budget")
    p.add_argument("--ledger", type=Path, help="privacy ledger (default: per site under the user data folder)")
    add_init_option(p)
    add_config_option(p)
    add_device_option(p)

    p = _command(sub, "score", "anomaly scores and heatmaps for every image in a folder",
                 "medae score --model runs/simulate --input /data/new-scans --out runs/scores", cmd_score)
    _bundle_in_out(p, input_help="folder of images to score (read only); a labels.csv there adds metrics",
                   out_help="output folder, replaced only when complete")
    p.add_argument("--no-heatmaps", action="store_true", help="write scores.csv and summary.json only")

    p = _command(sub, "denoise", "the model's clean reconstruction of every image, in the input's format and units",
                 "medae denoise --model runs/dae --input /data/noisy-scans --out runs/denoised", cmd_denoise)
    _bundle_in_out(p, model_help="run folder or model bundle (a DAE denoises best)",
                   out_help="output folder (DICOM stays DICOM, other images become PNG), replaced only when complete")

    p = _command(sub, "translate", "a conditional VAE's synthetic image of another contrast for every image "
                                   "(e.g. T1 to T2; not for diagnosis)",
                 "medae translate --model runs/cvae --input /data/t1-scans --to t2 --out runs/synthetic-t2",
                 cmd_translate)
    _bundle_in_out(p, model_help="run folder or model bundle of a conditional VAE (model.kind = cvae)",
                   out_help="output folder (DICOM stays DICOM with new UIDs, marked synthetic; other images "
                            "become PNG), replaced only when complete")
    p.add_argument("--to", required=True, metavar="LABEL", help="the label to translate to, one of the model's "
                                                                 "model.labels (e.g. t2)")

    p = _command(sub, "encode", "latent codes of every image in a folder (features, compression)",
                 "medae encode --model runs/simulate --input /data/scans --out runs/codes", cmd_encode)
    _bundle_in_out(p, out_help="output folder: codes.npz, manifest.csv, summary.json; replaced only when complete")

    p = _command(sub, "decode", "images from latent codes written by `medae encode`",
                 "medae decode --model runs/simulate --codes runs/codes --out runs/decoded", cmd_decode)
    p.add_argument("--model", type=Path, required=True, help="run folder or model bundle (the one that encoded)")
    p.add_argument("--codes", type=Path, required=True, help="the folder `medae encode` wrote, or its codes.npz")
    p.add_argument("--out", type=Path, required=True, help="output folder of PNG images, replaced only when complete")
    add_device_option(p)

    p = _command(sub, "sample", "new synthetic images from a VAE (spends no ε)",
                 "medae sample --model runs/vae --n 100 --out runs/samples --format dicom --seed 1", cmd_sample)
    p.add_argument("--model", type=Path, required=True, help="run folder or bundle of a VAE (model.kind = vae)")
    p.add_argument("--n", type=int, required=True, help="number of images")
    p.add_argument("--out", type=Path, required=True, help="output folder, replaced only when complete")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws")
    p.add_argument("--format", choices=("png", "dicom"), default="png",
                   help="png, or dicom (Secondary Capture marked synthetic, no site identifier)")
    p.add_argument("--label", help="a conditional VAE's label: the kind of image to make (e.g. t2); "
                                   "required for a CVAE, refused for other models")
    add_device_option(p)

    p = _command(sub, "simulate", "simulate a whole federation on this machine (Flower + Ray)",
                 "medae simulate --sites 3 --rounds 5 --out runs/simulate --baselines", cmd_simulate)
    add_config_option(p)
    p.add_argument("--data", type=Path, help="federation root: one subfolder per site (default: built-in benchmark)")
    p.add_argument("--sites", type=int, help="number of virtual sites")
    p.add_argument("--rounds", type=int, help="federated rounds")
    p.add_argument("--out", type=Path, default=Path("runs/simulate"), help="run folder to write")
    p.add_argument("--model", choices=MODEL_KINDS, help="model kind")
    p.add_argument("--image-size", type=int, choices=IMAGE_SIZES, help="image size in pixels")
    p.add_argument("--no-dp", action="store_true", help="train without differential privacy (a reference run)")
    add_init_option(p)
    p.add_argument("--baselines", action="store_true",
                   help="also train centralized (DP and non-DP) and per-site models, and the intensity baseline")
    p.add_argument("--no-reference", action="store_true",
                   help="skip the non-private reference (centralized training without DP, trained after the "
                        "federation unless federation.reference = false)")
    add_device_option(p)

    p = _command(sub, "server", "coordinator: run the federation's server (Flower SuperLink) and one run",
                 "medae server --certs certs --authorized-keys authorized --out runs/federation", cmd_server)
    add_config_option(p)
    p.add_argument("--certs", type=Path, help="folder made by `medae certs` (ca.crt, server.crt, server.key)")
    p.add_argument("--authorized-keys", type=Path, metavar="DIR",
                   help="the sites' .pub files (made by `medae keys`); other keys are refused")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="public port sites connect to")
    p.add_argument("--host", default="0.0.0.0", help="public address to listen on (default: all interfaces)")
    p.add_argument("--internal-port", type=int,
                   help="loopback port of the SuperLink and its Control API (default: PORT+1; never expose it)")
    p.add_argument("--rounds", type=int, help="federated rounds")
    p.add_argument("--out", type=Path, default=Path("runs/server"),
                   help="run folder; restarting with the same folder resumes (default: %(default)s)")
    p.add_argument("--model", choices=MODEL_KINDS, help="model kind")
    p.add_argument("--no-dp", action="store_true", help="ask sites to train without DP (each site may refuse)")
    add_init_option(p)
    p.add_argument("--insecure", action="store_true", help="no TLS, no site authentication (closed test networks)")

    p = _command(sub, "client", "hospital: join a federation with this site's data (Flower SuperNode)",
                 "medae client --server fl.example.org:9092 --ca ca.crt --key keys/hospital-a.key "
                 "--data /data/hospital-a", cmd_client)
    add_config_option(p)
    p.add_argument("--server", required=True, metavar="HOST:PORT", help="the coordinator's address")
    p.add_argument("--ca", type=Path, help="the federation's ca.crt (from the coordinator); required unless --insecure")
    p.add_argument("--key", type=Path, help="this site's private key (made by `medae keys`); required unless "
                                            "--insecure")
    p.add_argument("--data", type=Path, required=True, help="site folder (SITE/train, optional SITE/test); read only")
    p.add_argument("--ledger", type=Path, help="privacy ledger (default: per site under the user data folder)")
    p.add_argument("--site-name", help="name shown to the coordinator (default: the key file's name)")
    p.add_argument("--budget", type=float, help="this site's total ε budget, when its ledger is created")
    p.add_argument("--allow-no-dp", action="store_true", help="let the server ask for training without DP")
    p.add_argument("--image-cache", action="store_true",
                   help="keep decoded images between runs in this machine's image cache (`medae cache`); a copy of "
                        "patient pixels, so off unless the site turns it on")
    p.add_argument("--runtime-port", type=int, help="local port of the SuperNode's runtime API (default: a free one)")
    p.add_argument("--max-wait", type=float, metavar="SECONDS",
                   help="a SuperNode gives up after this long without reaching the server (default: keeps trying)")
    p.add_argument("--once", action="store_true",
                   help="leave when the SuperNode stops, instead of starting it again after a server restart")
    p.add_argument("--approved-fabs", type=Path, metavar="FILE",
                   help="run only app packages whose SHA-256 is listed in FILE (default: any package that carries "
                        "no code; code is always refused)")
    p.add_argument("--insecure", action="store_true", help="no TLS, no site authentication (closed test networks)")
    add_device_option(p)

    p = _command(sub, "certs", "a private CA and the server's TLS certificate (coordinator)",
                 "medae certs --out certs --server-name fl.example.org", cmd_certs)
    p.add_argument("--out", type=Path, required=True, help="folder to write (nothing is overwritten)")
    p.add_argument("--server-name", action="append", default=[], metavar="HOST",
                   help="DNS name or IP address sites connect to (repeatable; at least one)")

    p = _command(sub, "keys", "a site's authentication key pair (at the site)",
                 "medae keys --out keys --site hospital-a", cmd_keys)
    p.add_argument("--out", type=Path, required=True, help="folder to write (nothing is overwritten)")
    p.add_argument("--site", required=True, help="the site's name, e.g. hospital-a")

    p = sub.add_parser("privacy", help="privacy accounting", formatter_class=HelpFormatter,
                       epilog="example:\n  medae privacy ledger ~/.local/share/medae/ledgers/hospital-a.jsonl")
    psub = p.add_subparsers(dest="privacy_command", required=True, metavar="SUBCOMMAND")
    q = _command(psub, "epsilon", "ε of DP-SGD from the accounting code the sites use",
                 "medae privacy epsilon --sample-rate 0.1 --noise-multiplier 1.2 --steps 500 --delta 1e-5",
                 cmd_privacy_epsilon)
    q.add_argument("--sample-rate", type=float, required=True, help="Poisson sampling rate q (batch / units)")
    q.add_argument("--noise-multiplier", type=float, required=True, help="σ, noise std in units of the clipping norm")
    q.add_argument("--steps", type=int, required=True, help="DP-SGD steps")
    q.add_argument("--delta", type=float, required=True, help="δ")
    q.add_argument("--accountant", choices=("pld", "rdp", "prv"), default="pld",
                   help="pld (dp-accounting, tightest), rdp or prv (Opacus) (default: %(default)s)")
    q.add_argument("--json", action="store_true", help="one JSON object on stdout")
    q = _command(psub, "ledger", "show a site's privacy ledger (reads only)",
                 "medae privacy ledger ~/.local/share/medae/ledgers/hospital-a.jsonl", cmd_privacy_ledger)
    q.add_argument("path", type=Path, help="the ledger file (.jsonl)")
    q.add_argument("--json", action="store_true", help="one JSON object on stdout")
    q = _command(psub, "reset-ledger", "administrators only: set a broken ledger aside",
                 "medae privacy reset-ledger ~/.local/share/medae/ledgers/hospital-a.jsonl --yes",
                 cmd_privacy_reset)
    q.add_argument("path", type=Path, help="the ledger file (.jsonl)")
    q.add_argument("--yes", action="store_true", help="confirm: resetting forgets privacy already spent")
    q = _command(psub, "set-budget", "administrators only: change a site's total ε budget (recorded)",
                 "medae privacy set-budget LEDGER.jsonl --epsilon 10 --reason 'ethics board approval 2026-11' --yes",
                 cmd_privacy_set_budget)
    q.add_argument("path", type=Path, help="the ledger file (.jsonl)")
    q.add_argument("--epsilon", type=float, required=True, help="the new total budget")
    q.add_argument("--reason", default="", help="why, kept in the ledger (default: none)")
    q.add_argument("--yes", action="store_true", help="confirm the change")
    return parser


def _bundle_in_out(p: argparse.ArgumentParser, *, out_help: str, model_help: str = "run folder or model bundle",
                   input_help: str = "folder of images (read only)") -> None:
    """--model, --input, --out and --device: what every command that runs a bundle over a folder takes."""
    p.add_argument("--model", type=Path, required=True, help=model_help)
    p.add_argument("--input", type=Path, required=True, help=input_help)
    p.add_argument("--out", type=Path, required=True, help=out_help)
    add_device_option(p)


def add_init_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--init", metavar="BUNDLE", help='starting weights: a `medae pretrain` bundle, "builtin" '
                   '(the public model shipped with medae) or "none" (random)')


def _exit_on_sigterm(signum, frame) -> None:
    # `docker stop`, systemd and kill send SIGTERM: unwind like Ctrl-C so that the SuperLink or
    # SuperNode medae started is stopped too (the `finally` blocks run), then exit 143.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    import signal
    import threading

    args = build_parser().parse_args(argv)
    if args.command in ("server", "client") and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    configure_logging(args.verbose)
    try:
        return args.func(args)
    except MedaeError as exc:
        # Text, not markup: a path such as scans/a[/b] must print as it is.
        console.print(Text.assemble(("error: ", "bold red"), str(exc)), soft_wrap=True, highlight=False)
        return 2
    except KeyboardInterrupt:
        console.print("interrupted", style="yellow")
        return 130
    except Exception as exc:  # a bug or an unforeseen failure: one line, the traceback with -v
        if args.verbose:
            raise
        console.print(Text.assemble(("internal error: ", "bold red"), f"{type(exc).__name__}: {exc} "
                                    "(run again with -v for the traceback)"), soft_wrap=True, highlight=False)
        return 1


if __name__ == "__main__":
    sys.exit(main())
