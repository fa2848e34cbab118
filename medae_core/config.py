"""One typed configuration object describes a run.

`RunConfig` is loaded from TOML (``configs/*.toml``), adjusted by command-line
options, and handed unchanged to the single-site commands, the Flower
ServerApp and the Flower ClientApp. Flower's ``run_config`` only carries flat
scalars, so `RunConfig.to_flat` / `RunConfig.from_flat` map the nested object
onto dotted keys (``"model.kind" = "vae"``) and back, losslessly.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from medae_core.errors import ConfigError

ModelKind = Literal["ae", "vae", "dae", "sae", "cvae", "hvae"]
MODEL_KINDS: tuple[str, ...] = typing.get_args(ModelKind)  # the one list of model kinds
IMAGE_SIZES = (64, 128, 256)  # what the models are built for


@dataclass(frozen=True)
class ModelConfig:
    """Architecture. Maps one-to-one onto `medae_core.models.build_model`."""

    kind: ModelKind = "ae"
    image_size: int = 64  # 64, 128 or 256 px (IMAGE_SIZES)
    in_channels: int = 1
    channels: tuple[int, ...] = (16, 32, 64, 64)  # one stride-2 stage each
    latent_dim: int = 64
    groups: int = 8  # GroupNorm groups (BatchNorm cannot be made private)
    beta: float = 1.0  # VAE: weight of the KL term in the ELBO
    noise_std: float = 0.2  # DAE: std of additive Gaussian noise
    coarse_noise_std: float = 0.2  # DAE: std of coarse (low-resolution) noise
    coarse_noise_res: int = 16  # DAE: resolution of the coarse noise field
    sparsity_weight: float = 1e-3  # SAE: L1 weight on the code
    # CVAE: the labels it is conditioned on (contrasts, e.g. ["t1", "t2", "flair"]); each image's
    # label is found as data.contrasts says. Empty for every other kind.
    labels: tuple[str, ...] = ()  # CVAE: its condition labels, e.g. ["t1", "t2", "flair"]
    # HVAE: channels of its second, spatial latent at 1/4 of the image size (the first is latent_dim)
    local_latent_channels: int = 4  # HVAE: channels of the spatial latent at 1/4 of the image size

    def __post_init__(self) -> None:
        _positive(self, "model", "latent_dim", "in_channels", "groups", "coarse_noise_res", "local_latent_channels")
        _at_least(self, "model", 0.0, "beta", "noise_std", "coarse_noise_std", "sparsity_weight")
        _check_labels(self.labels, "model.labels")
        if self.kind == "cvae" and len(self.labels) < 2:
            raise ConfigError('model.kind = "cvae" needs at least two model.labels to condition on, '
                              'e.g. labels = ["t1", "t2", "flair"]')
        if self.kind != "cvae" and self.labels:
            raise ConfigError(f"model.labels is for the conditional VAE (kind = \"cvae\"); "
                              f"a {self.kind!r} takes no labels")



@dataclass(frozen=True)
class DataConfig:
    """How images are read and normalised; identical in training and scoring."""

    # "auto": the DICOM file's VOI window if present, else percentiles.
    # "window": window_center/window_width below. "percentile": per image.
    intensity: Literal["auto", "window", "percentile"] = "auto"
    window_center: float | None = None
    window_width: float | None = None
    percentile_low: float = 0.5
    percentile_high: float = 99.5
    min_foreground: float = 0.02  # slices with less foreground are left out
    val_fraction: float = 0.15  # share of patients held out for validation
    # Largest decoded pixel data of one file (rows x columns x frames x samples x bytes,
    # or a NIfTI volume's shape x dtype), in MiB, read from the header before decoding;
    # larger files are skipped with a reason. 1 GiB admits a 1000-slice 512 px CT in one file.
    max_image_mb: float = 1024.0
    # Keep each file's decoded, normalised slices between runs in an image cache outside the
    # data folder ($MEDAE_CACHE_DIR, else ~/.cache/medae/images), keyed by the file's bytes and
    # these settings. Off by default: it is a second copy of patient pixels (`medae cache`).
    cache: bool = False  # decoded images kept in $MEDAE_CACHE_DIR (default ~/.cache/medae/images)
    # The contrasts a run reads (e.g. ["flair"]); empty = every image. An image's contrast is the
    # first of: a contrast_map entry "TEXT=label" whose TEXT is in its DICOM SeriesDescription, a
    # label that is a word of its SeriesDescription, a label that names one of its folders.
    # Images of other contrasts, or of none, are left out with the reason. A CVAE reads its labels.
    contrasts: tuple[str, ...] = ()  # contrasts read (e.g. ["flair"]); empty = all; a CVAE: its labels
    contrast_map: tuple[str, ...] = ()  # "SeriesDescription text=label" entries, e.g. ["MPRAGE=t1"]

    def preprocessing(self) -> dict[str, Any]:
        """The settings that decide what reading a file gives (not how patients are split, which
        contrasts are kept, nor caching)."""
        left_out = ("val_fraction", "cache", "contrasts", "contrast_map")
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in left_out}

    def __post_init__(self) -> None:
        if not 0.0 <= self.percentile_low < self.percentile_high <= 100.0:
            raise ConfigError("data.percentile_low and data.percentile_high must satisfy 0 <= low < high <= 100; "
                              f"got {self.percentile_low} and {self.percentile_high}")
        _in_range(self, "data", "min_foreground", 0.0, 1.0)
        _in_range(self, "data", "val_fraction", 0.0, 1.0, high_open=True)
        _positive(self, "data", "max_image_mb")
        _check_labels(self.contrasts, "data.contrasts")
        for entry in self.contrast_map:
            text, sep, label = entry.rpartition("=")
            if not sep or not text.strip() or not label.strip() or "," in entry:
                raise ConfigError(f'data.contrast_map entries are "SeriesDescription text=label" (no commas), '
                                  f'e.g. "MPRAGE=t1"; got {entry!r}')



@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10  # single-site epochs; in a federation, epochs per round
    batch_size: int = 16  # expected batch size (Poisson sampling under DP)
    lr: float = 3e-4  # Adam; best of 1e-3 / 3e-4 over three seeds under DP (RESULTS-privacy-utility.md)
    weight_decay: float = 0.0
    seed: int = 0
    device: str = "auto"  # "auto" = CUDA when present, else CPU
    num_threads: int = 0  # torch CPU threads; 0 leaves torch's default
    # Starting weights: "builtin" = the public model shipped with medae (built and cached
    # on first use where none ships); a bundle path (`medae pretrain`); "none" = random
    init: str = "builtin"
    # What training changes: "all", or a comma list of encoder, decoder, bottleneck, norm, bias
    trainable: str = "all"
    # Patient unit: slices per sampled patient per step; its clipped gradient is their mean
    slices_per_patient: int = 1
    # Under DP: each slice plus m-1 mirrored, shifted copies, averaged before clipping
    augment_multiplicity: int = 1
    # Exponential moving average of the weights within a round (0 = off); free under DP
    ema_decay: float = 0.0
    # Synthetic training units: this many VAE samples per real unit (0 = off), drawn from the VAE
    # bundle augment_model (trained under DP, or a `medae pretrain` model); medae_core.augment
    augment_with_samples: float = 0.0  # VAE samples per real unit added to training (0 = off)
    augment_model: str = ""  # the VAE bundle they come from: DP-trained or `medae pretrain` only

    def __post_init__(self) -> None:
        _positive(self, "train", "epochs", "batch_size", "lr", "slices_per_patient", "augment_multiplicity")
        _at_least(self, "train", 0.0, "weight_decay", "num_threads")
        _in_range(self, "train", "ema_decay", 0.0, 1.0, high_open=True)
        _in_range(self, "train", "augment_with_samples", 0.0, 10.0)
        if self.augment_with_samples > 0 and not self.augment_model.strip():
            raise ConfigError("train.augment_with_samples needs train.augment_model: the VAE bundle to sample from")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device.strip().lower()):
            raise ConfigError(f"train.device must be auto, cpu, cuda or cuda:N; got {self.device!r}")



NOT_PRIVATE_AGAINST_COORDINATOR = (
    "privacy.reproducible_noise is on: the DP noise is seeded from the run's settings, so whoever knows "
    "them (the coordinator) can subtract it. This run is NOT private against the coordinator; use it "
    "for research on public or synthetic data only"
)


@dataclass(frozen=True)
class PrivacyConfig:
    enabled: bool = True
    budget_epsilon: float = 8.0  # total epsilon a site may ever spend
    delta: float = 1e-5
    noise_multiplier: float | None = None  # None: calibrate from the budget
    max_grad_norm: float = 1.0
    # automatic: every patient's gradient scaled to norm ~C, g * C / (||g|| + 0.01 C)
    # (Bu et al. 2023), so C needs no tuning under Adam; flat: Opacus' min(1, C / ||g||)
    clipping: Literal["flat", "automatic"] = "automatic"
    accountant: Literal["rdp", "prv", "pld"] = "pld"  # new ledgers; an existing one keeps its own
    unit: Literal["patient", "image"] = "patient"
    grad_sample_mode: str = "auto"  # auto, hooks, functorch, ew, ghost
    # ... or "bk" (medae_core.dp_clipping, book-keeping); "auto" picks "bk" for medae models
    ledger_path: str = ""  # empty: a per-site default under the user data dir
    # Research runs only: DP noise seeded from train.seed, the site and the round, so that a
    # run repeats exactly. Whoever knows the seed (the coordinator) can subtract the noise:
    # such a run is NOT private against the coordinator, says so everywhere, and deployed
    # sites refuse it. Default: noise from the operating system's entropy.
    reproducible_noise: bool = False

    def __post_init__(self) -> None:
        _positive(self, "privacy", "budget_epsilon", "max_grad_norm")
        _in_range(self, "privacy", "delta", 0.0, 1.0, low_open=True, high_open=True)
        if self.noise_multiplier is not None:
            _positive(self, "privacy", "noise_multiplier")



@dataclass(frozen=True)
class ScoringConfig:
    residual: Literal["l1", "l2", "ssim"] = "l1"
    positive_only: bool = False  # only count image brighter than reconstruction
    vae_score: Literal["recon", "elbo", "kl"] = "recon"
    median_filter: int = 5  # odd kernel size; 0 or 1 disables
    mask_foreground: bool = True
    top_percent: float = 1.0  # image score = mean of the top % of map pixels
    threshold_percentile: float = 95.0  # on healthy validation scores

    def __post_init__(self) -> None:
        _at_least(self, "scoring", 0.0, "median_filter")
        _in_range(self, "scoring", "top_percent", 0.0, 100.0, low_open=True)
        _in_range(self, "scoring", "threshold_percentile", 0.0, 100.0)



@dataclass(frozen=True)
class FederationConfig:
    rounds: int = 5
    sites: int = 3  # simulation only: number of virtual sites
    data_root: str = ""  # simulation: one subfolder per site; empty = benchmark
    strategy: Literal["fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg"] = "fedavg"
    fraction_train: float = 1.0
    min_sites: int = 2
    # Evaluate the global model (validation loss, threshold, test metrics) every N rounds;
    # the last round always evaluates. Evaluation is about a third of a round's time.
    evaluate_every: int = 1  # evaluate every N rounds; the last round always does
    # Simulation only: after the run, train the non-private reference (centralized, no DP, on the
    # sites' pooled training images) and score it and the intensity threshold exactly on the pooled
    # test set, so the report shows the model next to both. A deployment cannot: no image leaves a site.
    reference: bool = True  # simulation: also train the non-private reference (centralized, no DP)
    proximal_mu: float = 0.01  # FedProx
    server_lr: float = 0.01  # FedAdam (eta)
    trim_beta: float = 0.2  # FedTrimmedAvg
    client_cpus: float = 1.0
    client_gpus: float = 0.0
    # Built-in benchmark: patients per site (a hospital's size: 150 healthy training
    # patients with the 15 test patients) and its seed
    benchmark_patients: int = 165
    benchmark_test_patients: int = 15  # test patients (with lesions) per site; 0 = a third
    benchmark_seed: int = 0

    def __post_init__(self) -> None:
        _positive(self, "federation", "rounds", "sites", "min_sites", "evaluate_every", "benchmark_patients",
                  "server_lr")
        _in_range(self, "federation", "fraction_train", 0.0, 1.0, low_open=True)
        _in_range(self, "federation", "trim_beta", 0.0, 0.5, high_open=True)
        _at_least(self, "federation", 0.0, "proximal_mu", "client_cpus", "client_gpus", "benchmark_test_patients")



@dataclass(frozen=True)
class TrackingConfig:
    """Experiment tracking with a researcher's own tools: off by default, local files only, no network."""

    # Round metrics (losses, pooled AUROC and its baseline, threshold, each site's ε) and the
    # report's figures as TensorBoard events in RUN/tensorboard/ (needs the tensorboard package).
    tensorboard: bool = False  # round metrics and the report's figures to RUN/tensorboard/
    # The same, plus the run's configuration as parameters, in a local MLflow store
    # (RUN/mlflow/mlflow.db, SQLite; needs mlflow-skinny or mlflow). Telemetry is switched off.
    mlflow: bool = False  # round metrics, figures and config to RUN/mlflow/ (local SQLite store)


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        labels = self.model.labels
        if labels and not self.data.contrasts:  # a CVAE reads the contrasts it is conditioned on
            object.__setattr__(self, "data", dataclasses.replace(self.data, contrasts=labels))
        elif labels and self.data.contrasts != labels:
            raise ConfigError(f"a CVAE reads the contrasts it is conditioned on, in that order: data.contrasts "
                              f"{list(self.data.contrasts)} must be empty or model.labels {list(labels)}")
        if labels and self.train.augment_with_samples > 0:
            raise ConfigError("train.augment_with_samples draws unlabelled VAE samples; a CVAE cannot train on them")

    # -- construction -------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        return _build(cls, data, prefix="")

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        path = Path(path)
        try:
            with path.open("rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from None
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    def with_overrides(self, overrides: dict[str, Any]) -> RunConfig:
        """Return a copy with dotted keys replaced, skipping ``None`` values.

        Used by the command line: ``{"model.kind": "vae", "train.epochs": None}``
        sets the model kind and leaves the epochs as configured.
        """
        nested = self.to_dict()
        for key, value in overrides.items():
            if value is None:
                continue
            section, _, name = key.partition(".")
            if section not in nested or name not in nested[section]:
                raise ConfigError(f"unknown config key {key!r}")
            nested[section][name] = value
        return RunConfig.from_dict(nested)

    # -- Flower run_config ---------------------------------------------------
    def to_flat(self) -> dict[str, bool | int | float | str]:
        """Flat scalar mapping for Flower's run_config (None -> "", tuples -> "a,b")."""
        flat: dict[str, bool | int | float | str] = {}
        for section, values in self.to_dict().items():
            for name, value in values.items():
                if value is None:
                    value = ""
                elif isinstance(value, list):
                    value = ",".join(str(v) for v in value)
                flat[f"{section}.{name}"] = value
        return flat

    @classmethod
    def from_flat(cls, flat: dict[str, Any]) -> RunConfig:
        """Inverse of `to_flat`. Keys that are not config keys are ignored."""
        nested: dict[str, dict[str, Any]] = {}
        hints = {f.name: typing.get_type_hints(f.default_factory) for f in dataclasses.fields(cls)}
        for key, value in flat.items():
            section, _, name = key.partition(".")
            if section not in hints or name not in hints[section]:
                continue
            nested.setdefault(section, {})[name] = _from_flat_value(hints[section][name], value)
        return cls.from_dict(nested)


# -- value checks (each section's __post_init__) ----------------------------------
def _number(obj: Any, section: str, name: str) -> float:
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise ConfigError(f"{section}.{name} must be a number; got {value!r}")
    return value


def _positive(obj: Any, section: str, *names: str) -> None:
    for name in names:
        if _number(obj, section, name) <= 0:
            raise ConfigError(f"{section}.{name} must be greater than 0; got {getattr(obj, name)!r}")


def _at_least(obj: Any, section: str, low: float, *names: str) -> None:
    for name in names:
        if _number(obj, section, name) < low:
            raise ConfigError(f"{section}.{name} must be at least {low:g}; got {getattr(obj, name)!r}")


def _in_range(obj: Any, section: str, name: str, low: float, high: float, *,
              low_open: bool = False, high_open: bool = False) -> None:
    value = _number(obj, section, name)
    if (value <= low if low_open else value < low) or (value >= high if high_open else value > high):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ConfigError(f"{section}.{name} must be in {interval}; got {value!r}")


def _check_labels(labels: tuple[str, ...], key: str) -> None:
    for label in labels:
        if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,31}", label):
            raise ConfigError(f"{key} entries are short lower-case names (letters, digits, _ and -), "
                              f"e.g. \"t1\"; got {label!r}")
    if len(set(labels)) != len(labels):
        raise ConfigError(f"{key} lists a label twice: {list(labels)}")


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return list(obj)
    return obj


def _from_flat_value(hint: Any, value: Any) -> Any:
    if value == "" and _allows_none(hint):
        return None
    if _origin(hint) is tuple and isinstance(value, str):
        item = typing.get_args(hint)[0]
        return [item(v) if item is int else v for v in value.split(",") if v.strip()]
    return value


def _origin(hint: Any) -> Any:
    return typing.get_origin(hint)


def _allows_none(hint: Any) -> bool:
    return _origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"[{prefix.rstrip('.')}] must be a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + u for u in unknown)}; "
            f"valid keys here: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        key = prefix + name
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, prefix=key + ".")
        else:
            kwargs[name] = _coerce(hint, value, key)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    """Check a value against a field's type; allow int where float is expected."""
    if value is None and _allows_none(hint):
        return None
    origin = _origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        return _coerce(options[0], value, key)
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{key} must be one of {', '.join(map(str, allowed))}; got {value!r}")
        return value
    if origin is tuple:
        item = typing.get_args(hint)[0]
        ok = all(isinstance(v, item) and not isinstance(v, bool) for v in value) if isinstance(value, list | tuple) else False
        if not ok:
            raise ConfigError(f"{key} must be a list of {'integers' if item is int else 'strings'}; got {value!r}")
        return tuple(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false; got {value!r}")
    if hint in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{key} must be a number; got {value!r}")
    if not isinstance(value, hint):
        raise ConfigError(f"{key} must be {hint.__name__}; got {value!r}")
    return value

