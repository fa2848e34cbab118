"""Autoencoder models for anomaly detection, all trainable with Opacus DP-SGD.

About 700 lines: six kinds on one shared encoder/decoder, and the trainable-parameter
selection that needs their layer names.

`build_model(cfg, seed=...)` returns an `AnomalyModel`. Six kinds share one
convolutional encoder/decoder and one interface:

- ``"ae"``  plain autoencoder
- ``"vae"`` variational autoencoder (reparameterisation, KL term, ``sample``)
- ``"cvae"`` conditional VAE on a label per image (``model.labels``; `ConditionalVAE`)
- ``"hvae"`` hierarchical VAE: a global and a spatial code (`HierarchicalVAE`)
- ``"dae"`` denoising autoencoder: during training the input is corrupted with
  additive Gaussian noise plus coarse, low-resolution Gaussian noise upsampled
  bilinearly (Kascenas et al., 2022, "Denoising autoencoders for unsupervised
  anomaly detection in brain MRI"); the target is the clean image
- ``"sae"`` sparse autoencoder: L1 penalty on the code

Architecture (one stride-2 stage per entry of ``cfg.channels``, L stages,
R = image_size / 2^L)::

    encoder: [Conv3x3 stride 2 -> GroupNorm -> LeakyReLU] * L
             -> Conv1x1 to 16 channels ("squeeze") -> flatten -> Linear -> code
    decoder: Linear -> 16 x R x R -> LeakyReLU -> Conv1x1 ("expand") -> LeakyReLU
             -> [2x up-block -> GroupNorm -> LeakyReLU] * (L-1) -> 2x up-block -> sigmoid

A 2x up-block is nearest ``Upsample2x`` + Conv3x3 at low resolution and a
sub-pixel conv (Conv3x3 to 4x channels + PixelShuffle, ICNR-initialised) where
the input resolution squared exceeds the output channels (see `_up_block`).

Only layers Opacus can compute per-sample gradients for carry parameters
(Conv2d, GroupNorm, Linear; Upsample/PixelShuffle/activations are
parameter-free): no BatchNorm, and no ConvTranspose2d (which forces Opacus onto
its slow functorch path). The squeeze/expand 1x1 convolutions keep the dense
bottleneck small: parameters in low-resolution layers are what make per-sample
gradients expensive (see benchmarks/RESULTS-dp-throughput.md), and every
parameter also receives DP noise.

Images are tensors ``[B, C, S, S]`` in [0, 1]; the decoder ends in a sigmoid.

Interface (every kind)
----------------------
Every call below also takes ``cond``: the label index of each image [B], which a
conditional model (``conditional = True``) needs and the others ignore.

``forward(x, generator=None, cond=None) -> ModelOutput``
    Everything the loss needs: ``recon`` (sigmoid output, like ``x``), ``code``
    (the latent code; for the VAE the sampled ``z``), and for the VAE ``mu`` and
    ``logvar``. In training mode the VAE samples ``z = mu + sigma * eps`` with
    ``eps`` drawn from ``generator`` (a CPU generator is fine on any device);
    in eval mode ``z = mu``.
``per_sample_loss(x_target, out) -> Tensor[B]``
    Mean squared error over pixels plus the model term: ``beta * KL / n_pixels``
    for the VAE (the negative ELBO per pixel, up to a constant),
    ``sparsity_weight * mean(|code|)`` for the SAE. One value per image: DP-SGD
    clips per-sample gradients of exactly this.
``corrupt(x, generator) -> Tensor``
    The training input for a clean batch: noisy for the DAE in training mode,
    ``x`` itself otherwise (and always in eval mode).
``reconstruct(x)``, ``encode(x)``, ``decode(z)``
    Deterministic (the VAE uses the posterior mean); no corruption.
VAE only: ``kl_per_sample(x) -> Tensor[B]``, ``elbo_terms(x) -> (squared error
map [B, C, S, S], KL [B])`` for anomaly scoring, ``sample(n, generator)``.

Initialisation is a pure function of ``seed``: same seed, same weights.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medae_core.config import IMAGE_SIZES, MODEL_KINDS, ModelConfig
from medae_core.errors import ConfigError

__all__ = [
    "MODEL_KINDS",
    "SUPPORTED_IMAGE_SIZES",
    "AnomalyModel",
    "AutoEncoder",
    "ConditionalVAE",
    "HierarchicalVAE",
    "DenoisingAutoEncoder",
    "ModelOutput",
    "SparseAutoEncoder",
    "SubPixelConv",
    "Upsample2x",
    "VariationalAutoEncoder",
    "build_model",
    "count_parameters",
    "validate_model_config",
]

SUPPORTED_IMAGE_SIZES = IMAGE_SIZES

# The 1x1 "squeeze" conv in front of the dense bottleneck has at most 16
# channels and at most 1024 flattened features (fewer channels at 256 px).
_BOTTLENECK_CHANNELS = 16
_BOTTLENECK_FEATURES = 1024
_LEAK = 0.2


class ModelOutput(NamedTuple):
    """What `AnomalyModel.forward` returns and `per_sample_loss` consumes."""

    recon: Tensor  # [B, C, S, S], in (0, 1)
    code: Tensor  # [B, latent_dim]; the sampled z for the VAE
    mu: Tensor | None = None  # VAE only
    logvar: Tensor | None = None  # VAE only
    kl: Tensor | None = None  # HVAE: the spatial code's KL term per image [B]


def validate_model_config(cfg: ModelConfig) -> None:
    """Raise `ConfigError` with a specific message if `cfg` cannot be built."""
    if cfg.kind not in MODEL_KINDS:
        raise ConfigError(f"model.kind must be one of {', '.join(MODEL_KINDS)}; got {cfg.kind!r}")
    if cfg.image_size not in SUPPORTED_IMAGE_SIZES:
        raise ConfigError(
            f"model.image_size must be one of {', '.join(map(str, SUPPORTED_IMAGE_SIZES))}; "
            f"got {cfg.image_size}"
        )
    if cfg.in_channels < 1:
        raise ConfigError(f"model.in_channels must be at least 1; got {cfg.in_channels}")
    if not cfg.channels:
        raise ConfigError("model.channels must list at least one stage, e.g. [32, 64, 128, 128]")
    if any(c < 1 for c in cfg.channels):
        raise ConfigError(f"model.channels must be positive; got {list(cfg.channels)}")
    if cfg.image_size % (2 ** len(cfg.channels)) != 0 or cfg.image_size // 2 ** len(cfg.channels) < 1:
        raise ConfigError(
            f"model.channels has {len(cfg.channels)} stride-2 stages, too many for "
            f"image_size {cfg.image_size}; use at most {int(math.log2(cfg.image_size))}"
        )
    if cfg.latent_dim < 1:
        raise ConfigError(f"model.latent_dim must be at least 1; got {cfg.latent_dim}")
    if cfg.groups < 0:
        raise ConfigError(f"model.groups must be >= 0 (0 disables GroupNorm); got {cfg.groups}")
    if cfg.groups > 0:
        bad = [c for c in cfg.channels if c % cfg.groups != 0]
        if bad:
            raise ConfigError(
                f"model.groups={cfg.groups} must divide every entry of model.channels; "
                f"{bad} are not divisible (choose groups that divides {list(cfg.channels)})"
            )
    if cfg.kind == "hvae":
        hierarchical_level(cfg)
    if cfg.kind in ("vae", "cvae", "hvae") and cfg.beta < 0:
        raise ConfigError(f"model.beta must be >= 0; got {cfg.beta}")
    if cfg.kind == "dae":
        if cfg.noise_std < 0 or cfg.coarse_noise_std < 0:
            raise ConfigError("model.noise_std and model.coarse_noise_std must be >= 0")
        if not 1 <= cfg.coarse_noise_res <= cfg.image_size:
            raise ConfigError(
                f"model.coarse_noise_res must be between 1 and image_size ({cfg.image_size}); "
                f"got {cfg.coarse_noise_res}"
            )
    if cfg.kind == "sae" and cfg.sparsity_weight < 0:
        raise ConfigError(f"model.sparsity_weight must be >= 0; got {cfg.sparsity_weight}")


class Upsample2x(nn.Module):
    """Nearest-neighbour 2x upsampling as a broadcast + reshape.

    Same result as ``nn.Upsample(scale_factor=2, mode="nearest")``, but the
    CPU kernel behind ``F.interpolate`` on NCHW tensors was measured ~10x
    slower here (134 ms vs 14 ms for a [64, 32, 32, 32] batch).
    Parameter-free, so Opacus needs no per-sample gradient for it.
    """

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        return x[:, :, :, None, :, None].expand(b, c, h, 2, w, 2).reshape(b, c, 2 * h, 2 * w)


def _bottleneck_channels(cfg: ModelConfig) -> int:
    res = cfg.image_size // 2 ** len(cfg.channels)
    return max(1, min(_BOTTLENECK_CHANNELS, cfg.channels[-1], _BOTTLENECK_FEATURES // (res * res)))


def _norm(channels: int, groups: int) -> nn.Module:
    return nn.GroupNorm(groups, channels) if groups > 0 else nn.Identity()


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig, out_features: int, extra_inputs: int = 0):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = cfg.in_channels + extra_inputs  # a CVAE's label planes come in with the image
        self.stage_ends: list[int] = []  # index in `features` after each stage (an HVAE reads one)
        for c in cfg.channels:
            layers += [
                nn.Conv2d(c_in, c, kernel_size=3, stride=2, padding=1),
                _norm(c, cfg.groups),
                nn.LeakyReLU(_LEAK),
            ]
            self.stage_ends.append(len(layers))
            c_in = c
        self.features = nn.Sequential(*layers)
        self.bottleneck_channels = _bottleneck_channels(cfg)
        self.squeeze = nn.Conv2d(c_in, self.bottleneck_channels, kernel_size=1)
        self.res = cfg.image_size // 2 ** len(cfg.channels)
        self.fc = nn.Linear(self.bottleneck_channels * self.res * self.res, out_features)

    def forward(self, x: Tensor) -> Tensor:
        h = self.squeeze(self.features(x))
        return self.fc(h.flatten(1))


class SubPixelConv(nn.Module):
    """3x3 conv at low resolution to ``4 * out`` channels, then PixelShuffle(2).

    Doubles the resolution like Upsample2x + Conv3x3 with the same FLOPs, but
    the convolution runs at the low resolution (4x fewer positions).
    """

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, 4 * c_out, kernel_size=3, padding=1)
        self.shuffle = nn.PixelShuffle(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.shuffle(self.conv(x))


def _up_block(c_in: int, c_out: int, res_in: int) -> list[nn.Module]:
    """One 2x upsampling stage: sub-pixel conv at high resolution, else Upsample2x + conv.

    Both have the same FLOPs. The sub-pixel conv runs at the input resolution
    (4x fewer positions: cheaper per-sample gradients, faster on CPU) but has
    4x the parameters; it is used where positions outnumber output channels
    (res_in^2 > c_out), i.e. in the high-resolution stages where parameters
    are few. At low resolution the upsample + conv keeps the model small
    (fewer parameters = less DP noise, smaller federated updates).
    """
    if res_in * res_in > c_out:
        return [SubPixelConv(c_in, c_out)]
    return [Upsample2x(), nn.Conv2d(c_in, c_out, kernel_size=3, padding=1)]


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig, extra_inputs: int = 0):
        super().__init__()
        chans = list(cfg.channels)
        self.res = cfg.image_size // 2 ** len(chans)
        self.bc = _bottleneck_channels(cfg)
        # Mirror of the encoder's squeeze: a small Linear to bc channels, then
        # a 1x1 conv up to the deepest channel count.
        self.fc = nn.Linear(cfg.latent_dim + extra_inputs, self.bc * self.res * self.res)
        self.expand = nn.Conv2d(self.bc, chans[-1], kernel_size=1)
        layers: list[nn.Module] = []
        res = self.res
        self.stage_ends: list[int] = []  # index in `features` after each stage's norm (a CVAE conditions there)
        self.stage_channels: list[int] = []
        # Stages from the deepest feature map back up: chans[-1] -> ... -> chans[0].
        for c_in, c_out in zip(chans[::-1][:-1], chans[::-1][1:]):
            layers += _up_block(c_in, c_out, res) + [_norm(c_out, cfg.groups)]
            self.stage_ends.append(len(layers))
            self.stage_channels.append(c_out)
            layers.append(nn.LeakyReLU(_LEAK))
            res *= 2
        layers += _up_block(chans[0], cfg.in_channels, res)
        self.features = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return torch.sigmoid(self.features(self.stem(z)))

    def stem(self, z: Tensor) -> Tensor:
        """The deepest feature map [B, channels[-1], R, R] from a code (and a CVAE's label)."""
        h = F.leaky_relu(self.fc(z), _LEAK).view(-1, self.bc, self.res, self.res)
        return F.leaky_relu(self.expand(h), _LEAK)


class AnomalyModel(nn.Module):
    """Base class: a convolutional autoencoder with the uniform interface.

    Subclasses change the code (VAE), the loss term (VAE, SAE) or the training
    input (DAE). See the module docstring for the interface contract.
    """

    kind: str = "ae"

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        validate_model_config(cfg)
        self.cfg = cfg
        self.encoder = Encoder(cfg, self._encoder_outputs(cfg))
        self.decoder = Decoder(cfg)

    @staticmethod
    def _encoder_outputs(cfg: ModelConfig) -> int:
        return cfg.latent_dim

    # -- core ------------------------------------------------------------------
    conditional: bool = False  # True: every call takes `cond`, the label index of each image [B]

    def encode(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        """Latent code [B, latent_dim] (the posterior mean for the VAE)."""
        return self.encoder(x)

    def decode(self, z: Tensor, cond: Tensor | None = None) -> Tensor:
        """Images [B, C, S, S] in (0, 1) from codes [B, latent_dim]."""
        return self.decoder(z)

    def forward(self, x: Tensor, generator: torch.Generator | None = None, cond: Tensor | None = None) -> ModelOutput:
        code = self.encode(x, cond)
        return ModelOutput(recon=self.decode(code, cond), code=code)

    def per_sample_loss(self, x_target: Tensor, out: ModelOutput) -> Tensor:
        """One loss value per image, shape [B]: MSE over pixels + model term."""
        return (out.recon - x_target).pow(2).flatten(1).mean(1)

    def corrupt(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Training input for the clean batch `x` (identity except for the DAE)."""
        return x

    @torch.no_grad()
    def reconstruct(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        """Deterministic reconstruction of `x` (no corruption, VAE uses the mean)."""
        return self.decode(self.encode(x, cond), cond)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.cfg.in_channels, self.cfg.image_size, self.cfg.image_size)


class AutoEncoder(AnomalyModel):
    kind = "ae"


class SparseAutoEncoder(AnomalyModel):
    """AE with an L1 penalty ``sparsity_weight * mean(|code|)`` on the code."""

    kind = "sae"

    def per_sample_loss(self, x_target: Tensor, out: ModelOutput) -> Tensor:
        mse = super().per_sample_loss(x_target, out)
        return mse + self.cfg.sparsity_weight * out.code.abs().mean(1)


class DenoisingAutoEncoder(AnomalyModel):
    """AE trained to remove additive fine + coarse Gaussian noise (Kascenas et al. 2022)."""

    kind = "dae"

    def corrupt(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if not self.training:
            return x
        cfg = self.cfg
        gen_device = generator.device if generator is not None else torch.device("cpu")
        shape = x.shape
        noise = cfg.noise_std * torch.randn(shape, generator=generator, device=gen_device)
        if cfg.coarse_noise_std > 0:
            r = cfg.coarse_noise_res
            coarse = torch.randn((shape[0], shape[1], r, r), generator=generator, device=gen_device)
            coarse = F.interpolate(coarse, size=shape[-2:], mode="bilinear", align_corners=False)
            noise = noise + cfg.coarse_noise_std * coarse
        return x + noise.to(device=x.device, dtype=x.dtype)


class VariationalAutoEncoder(AnomalyModel):
    """Gaussian VAE with a standard normal prior.

    The encoder's Linear layer outputs ``2 * latent_dim`` values: the posterior
    mean and log-variance. ``per_sample_loss`` is the negative ELBO divided by
    the number of pixels: ``MSE + beta * KL(q(z|x) || N(0, I)) / n_pixels``.
    """

    kind = "vae"

    @staticmethod
    def _encoder_outputs(cfg: ModelConfig) -> int:
        return 2 * cfg.latent_dim

    def posterior(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(mu, logvar) of q(z|x), each [B, latent_dim]."""
        return _gaussian(self.encoder(x))

    def encode(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        return self.posterior(x, cond)[0]

    def forward(self, x: Tensor, generator: torch.Generator | None = None, cond: Tensor | None = None) -> ModelOutput:
        mu, logvar = self.posterior(x, cond)
        z = _draw(mu, logvar, generator) if self.training else mu
        return ModelOutput(recon=self.decode(z, cond), code=z, mu=mu, logvar=logvar)

    @staticmethod
    def kl_from(mu: Tensor, logvar: Tensor) -> Tensor:
        """KL(N(mu, exp(logvar)) || N(0, I)) per sample, shape [B] (nats)."""
        return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(1)

    def per_sample_loss(self, x_target: Tensor, out: ModelOutput) -> Tensor:
        mse = super().per_sample_loss(x_target, out)
        n_pixels = x_target[0].numel()
        return mse + self.cfg.beta * self.kl_from(out.mu, out.logvar) / n_pixels

    @torch.no_grad()
    def kl_per_sample(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        """KL divergence of the posterior from the prior for each image, [B]."""
        return self.kl_from(*self.posterior(x, cond))

    @torch.no_grad()
    def elbo_terms(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(squared error map of the mean reconstruction [B, C, S, S], KL [B])."""
        mu, logvar = self.posterior(x, cond)
        recon = self.decode(mu, cond)
        return (recon - x).pow(2), self.kl_from(mu, logvar)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, cond: Tensor | None = None) -> Tensor:
        """Decode ``n`` draws z ~ N(0, I) into new images [n, C, S, S]."""
        device = next(self.parameters()).device
        gen_device = generator.device if generator is not None else torch.device("cpu")
        z = torch.randn((n, self.cfg.latent_dim), generator=generator, device=gen_device)
        return self.decode(z.to(device), cond)


def _gaussian(t: Tensor) -> tuple[Tensor, Tensor]:
    """(mu, logvar) from a layer's output: its channels halved, the log-variance kept in [-12, 12]."""
    mu, logvar = t.chunk(2, dim=1)
    return mu, logvar.clamp(-12.0, 12.0)


def _draw(mu: Tensor, logvar: Tensor, generator: torch.Generator | None) -> Tensor:
    """The reparameterised sample mu + sigma * eps, eps from `generator` (any device's)."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    eps = torch.randn(mu.shape, generator=generator, device=gen_device)
    return mu + torch.exp(0.5 * logvar) * eps.to(device=mu.device, dtype=mu.dtype)


def gaussian_kl(mu: Tensor, logvar: Tensor, mu_p: Tensor, logvar_p: Tensor) -> Tensor:
    """KL(N(mu, e^logvar) || N(mu_p, e^logvar_p)) summed over all but the batch axis, [B] (nats)."""
    kl = 0.5 * (logvar_p - logvar + (logvar.exp() + (mu - mu_p).pow(2)) / logvar_p.exp() - 1.0)
    return kl.flatten(1).sum(1)


class ConditionalVAE(VariationalAutoEncoder):
    """A VAE conditioned on a label per image: its contrast (``model.labels``), e.g. T1, T2 or FLAIR.

    The label enters three times (Sohn et al. 2015; FiLM, Perez et al. 2018): as one-hot
    planes concatenated to the encoder's input, concatenated to the code in the
    decoder's first dense layer, and as a per-channel scale and shift after every
    decoder stage's GroupNorm (a Linear from the one-hot, zero-initialised, so training
    starts from the unconditional decoder). All are Conv2d or Linear: Opacus and the
    book-keeping clipper compute their per-sample gradients like any other layer's.

    Translation encodes an image with its own label and decodes the code with
    another (`translate`); generation decodes prior draws with a chosen label.
    ``cond`` is an integer tensor [B] of positions in ``model.labels``.
    """

    kind = "cvae"
    conditional = True

    def __init__(self, cfg: ModelConfig):
        nn.Module.__init__(self)
        validate_model_config(cfg)
        self.cfg = cfg
        k = len(cfg.labels)
        self.encoder = Encoder(cfg, 2 * cfg.latent_dim, extra_inputs=k)
        self.decoder = Decoder(cfg, extra_inputs=k)
        self.film = nn.ModuleList(nn.Linear(k, 2 * c) for c in self.decoder.stage_channels)

    def _onehot(self, cond: Tensor | None, like: Tensor) -> Tensor:
        if cond is None:
            raise ConfigError("a conditional VAE needs each image's label (cond); the data gave none")
        cond = torch.as_tensor(cond, device=like.device).long().reshape(-1)
        k = len(self.cfg.labels)
        if cond.numel() != like.shape[0] or bool(((cond < 0) | (cond >= k)).any()):
            raise ConfigError(f"cond must hold one label index in [0, {k}) per image")
        return F.one_hot(cond, k).to(like.dtype)

    def posterior(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        c = self._onehot(cond, x)
        planes = c[:, :, None, None].expand(-1, -1, *x.shape[-2:])
        return _gaussian(self.encoder(torch.cat([x, planes], dim=1)))

    def decode(self, z: Tensor, cond: Tensor | None = None) -> Tensor:
        c = self._onehot(cond, z)
        h = self.decoder.stem(torch.cat([z, c], dim=1))
        stage = 0
        for i, layer in enumerate(self.decoder.features, start=1):
            h = layer(h)
            if stage < len(self.film) and i == self.decoder.stage_ends[stage]:
                scale, shift = self.film[stage](c).chunk(2, dim=1)
                h = h * (1.0 + scale[:, :, None, None]) + shift[:, :, None, None]
                stage += 1
        return torch.sigmoid(h)

    @torch.no_grad()
    def translate(self, x: Tensor, cond: Tensor, target: Tensor) -> Tensor:
        """``x`` (labels ``cond``) as the model would show it with labels ``target``: [B, C, S, S]."""
        return self.decode(self.encode(x, cond), target)


class HierarchicalVAE(VariationalAutoEncoder):
    """A two-level VAE: a global code (``latent_dim``) and a spatial code at 1/4 of the image size.

    Ladder / top-down design kept small for DP (Sønderby et al. 2016; Vahdat & Kautz
    2020, NVAE): the encoder's features at 1/4 resolution and the decoder's features
    there (from the global code) give the posterior of the spatial code
    ``q(z2 | x, z1)`` (a 1x1 conv of both), the decoder's features alone give its prior
    ``p(z2 | z1)``; the decoder adds a 1x1 conv of ``z2`` to its features and goes on up
    to the image. The loss is the negative ELBO per pixel, both KL terms included.
    The spatial code carries local detail the global code cannot, which a flat VAE
    loses at 128 and 256 px; its KL term keeps it from copying the image (and its
    anomalies) through. Every layer is Conv2d, Linear or GroupNorm.
    """

    kind = "hvae"

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.level = hierarchical_level(cfg)
        enc_channels = cfg.channels[1]  # the encoder's features after two stride-2 stages: 1/4 size
        dec_channels = self.decoder.stage_channels[self.level]
        zc = cfg.local_latent_channels
        self.local_posterior = nn.Conv2d(enc_channels + dec_channels, 2 * zc, kernel_size=1)
        self.local_prior = nn.Conv2d(dec_channels, 2 * zc, kernel_size=1)
        self.local_in = nn.Conv2d(zc, dec_channels, kernel_size=1)

    def _features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(the encoder's features at 1/4 size, the global posterior's raw output)."""
        enc = self.encoder
        h = x
        skip = None
        for i, layer in enumerate(enc.features, start=1):
            h = layer(h)
            if i == enc.stage_ends[1]:  # after two stride-2 stages: 1/4 size
                skip = h
        return skip, enc.fc(enc.squeeze(h).flatten(1))

    def _top(self, z1: Tensor) -> tuple[Tensor, int]:
        """The decoder from the global code up to the 1/4-size stage: (features, next layer index)."""
        h = self.decoder.stem(z1)
        end = self.decoder.stage_ends[self.level] + 1  # through that stage's activation
        for layer in self.decoder.features[:end]:
            h = layer(h)
        return h, end

    def _bottom(self, h: Tensor, z2: Tensor, start: int) -> Tensor:
        h = h + self.local_in(z2)
        for layer in self.decoder.features[start:]:
            h = layer(h)
        return torch.sigmoid(h)

    def posterior(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return _gaussian(self._features(x)[1])

    def _pass(self, x: Tensor, generator: torch.Generator | None, sample: bool):
        skip, top = self._features(x)
        mu, logvar = _gaussian(top)
        z1 = _draw(mu, logvar, generator) if sample else mu
        h, start = self._top(z1)
        mu2, logvar2 = _gaussian(self.local_posterior(torch.cat([skip, h], dim=1)))
        mu2_p, logvar2_p = _gaussian(self.local_prior(h))
        z2 = _draw(mu2, logvar2, generator) if sample else mu2
        recon = self._bottom(h, z2, start)
        return recon, z1, mu, logvar, gaussian_kl(mu2, logvar2, mu2_p, logvar2_p)

    def forward(self, x: Tensor, generator: torch.Generator | None = None, cond: Tensor | None = None) -> ModelOutput:
        recon, z1, mu, logvar, kl_local = self._pass(x, generator, sample=self.training)
        return ModelOutput(recon=recon, code=z1, mu=mu, logvar=logvar, kl=kl_local)

    def per_sample_loss(self, x_target: Tensor, out: ModelOutput) -> Tensor:
        return super().per_sample_loss(x_target, out) + self.cfg.beta * out.kl / x_target[0].numel()

    def decode(self, z: Tensor, cond: Tensor | None = None) -> Tensor:
        """Images from global codes; the spatial code is its prior's mean given them."""
        h, start = self._top(z)
        return self._bottom(h, _gaussian(self.local_prior(h))[0], start)

    @torch.no_grad()
    def reconstruct(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        return self._pass(x, None, sample=False)[0]

    @torch.no_grad()
    def kl_per_sample(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        _, _, mu, logvar, kl_local = self._pass(x, None, sample=False)
        return self.kl_from(mu, logvar) + kl_local

    @torch.no_grad()
    def elbo_terms(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        recon, _, mu, logvar, kl_local = self._pass(x, None, sample=False)
        return (recon - x).pow(2), self.kl_from(mu, logvar) + kl_local

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, cond: Tensor | None = None) -> Tensor:
        """Both levels from their priors: z1 ~ N(0, I), z2 ~ p(z2 | z1)."""
        device = next(self.parameters()).device
        gen_device = generator.device if generator is not None else torch.device("cpu")
        z1 = torch.randn((n, self.cfg.latent_dim), generator=generator, device=gen_device).to(device)
        h, start = self._top(z1)
        mu_p, logvar_p = _gaussian(self.local_prior(h))
        return self._bottom(h, _draw(mu_p, logvar_p, generator), start)


def hierarchical_level(cfg: ModelConfig) -> int:
    """The decoder stage whose output is at 1/4 of the image size (where the spatial code lives)."""
    stages = len(cfg.channels)
    if stages < 3:
        raise ConfigError(f"model.kind = \"hvae\" needs at least 3 stride-2 stages in model.channels "
                          f"(its spatial code sits at 1/4 size); got {list(cfg.channels)}")
    return stages - 3  # decoder stage i ends at image_size / 2^(stages - 1 - i)


_KINDS: dict[str, type[AnomalyModel]] = {
    "ae": AutoEncoder,
    "vae": VariationalAutoEncoder,
    "dae": DenoisingAutoEncoder,
    "sae": SparseAutoEncoder,
    "cvae": ConditionalVAE,
    "hvae": HierarchicalVAE,
}


@torch.no_grad()
def init_weights(model: nn.Module, seed: int) -> None:
    """(Re)initialise every parameter from a private generator seeded with `seed`."""
    gen = torch.Generator().manual_seed(int(seed))
    for m in model.modules():
        if isinstance(m, SubPixelConv):
            # ICNR: the four sub-pixel kernels start identical, so the layer
            # starts out as nearest upsampling of a conv (no checkerboard).
            w = torch.empty(m.conv.out_channels // 4, *m.conv.weight.shape[1:])
            nn.init.kaiming_uniform_(w, a=_LEAK, nonlinearity="leaky_relu", generator=gen)
            m.conv.weight.copy_(w.repeat_interleave(4, dim=0))
            nn.init.zeros_(m.conv.bias)
            m.conv._medae_initialised = True
        elif isinstance(m, nn.Conv2d | nn.Linear):
            if getattr(m, "_medae_initialised", False):
                del m._medae_initialised
                continue
            # Kaiming-uniform for leaky ReLU, the PyTorch default family.
            nn.init.kaiming_uniform_(m.weight, a=_LEAK, nonlinearity="leaky_relu", generator=gen)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.GroupNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for film in getattr(model, "film", ()):  # a CVAE starts as the unconditional decoder
        nn.init.zeros_(film.weight)
        nn.init.zeros_(film.bias)


def build_model(cfg: ModelConfig, seed: int = 0) -> AnomalyModel:
    """Build the model described by `cfg`; weights are a function of `seed` only."""
    validate_model_config(cfg)
    # Layer constructors draw default weights from the global RNG; keep the
    # caller's global RNG state untouched (the weights come from `seed` only).
    with torch.random.fork_rng(devices=[]):
        model = _KINDS[cfg.kind](cfg)
    init_weights(model, seed)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# -- what training changes -------------------------------------------------------
TRAINABLE_PARTS = ("all", "encoder", "decoder", "bottleneck", "norm", "bias", "input", "output")


def trainable_mask(model: nn.Module, spec: str) -> dict[str, bool]:
    """Parameter name -> trained?, for ``train.trainable``.

    ``spec`` is ``"all"`` or a comma list of parts: ``encoder``, ``decoder``;
    ``bottleneck`` (the 1x1 squeeze/expand convolutions and the dense layers
    between them, the VAE's heads included); ``norm`` (GroupNorm affines);
    ``bias`` (every bias); ``input`` / ``output`` (the encoder's first and the
    decoder's last convolution: where a scanner's contrast enters and leaves).
    A parameter is trained if any listed part holds it.
    """
    parts = [p.strip() for p in str(spec).split(",") if p.strip()]
    unknown = sorted(set(parts) - set(TRAINABLE_PARTS))
    if not parts or unknown:
        raise ConfigError(
            f"train.trainable must be 'all' or a comma list of {', '.join(TRAINABLE_PARTS[1:])}; got {spec!r}"
        )
    owner = {f"{name}.{pname}" if name else pname: m
             for name, m in model.named_modules() for pname, _ in m.named_parameters(recurse=False)}
    owner_name = {f"{name}.{pname}" if name else pname: name
                  for name, m in model.named_modules() for pname, _ in m.named_parameters(recurse=False)}
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)]
    first_in = next((n for n in convs if n.startswith("encoder.")), None)
    last_out = next((n for n in reversed(convs) if n.startswith("decoder.")), None)
    mask = {}
    for name, _ in model.named_parameters():
        held = {
            "all": True,
            "encoder": name.startswith("encoder."),
            "decoder": name.startswith("decoder."),
            "bottleneck": name.split(".")[1] in ("squeeze", "fc", "expand", "mu", "logvar"),
            "norm": isinstance(owner[name], nn.GroupNorm),
            "bias": name.endswith(".bias"),
            "input": owner_name[name] == first_in,
            "output": owner_name[name] == last_out,
        }
        mask[name] = any(held[p] for p in parts)
    if not any(mask.values()):
        raise ConfigError(f"train.trainable = {spec!r} selects no parameter of this model")
    return mask


def set_trainable(model: nn.Module, spec: str) -> int:
    """Freeze every parameter `trainable_mask` leaves out (requires_grad); return the trained count."""
    mask = trainable_mask(model, spec)
    for name, p in model.named_parameters():
        p.requires_grad_(mask[name])
    return count_parameters(model)
