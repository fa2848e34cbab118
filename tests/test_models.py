"""Models: every kind builds at every size, is Opacus-compatible, and is seeded."""

import pytest
import torch
from opacus.validators import ModuleValidator
from torch import nn

from medae_core.config import ModelConfig
from medae_core.errors import ConfigError
from medae_core.models import (
    MODEL_KINDS,
    AnomalyModel,
    SubPixelConv,
    Upsample2x,
    VariationalAutoEncoder,
    build_model,
)

torch.set_num_threads(1)

SMALL = dict(channels=(8, 16, 16), latent_dim=8, groups=4)


LABELS = ("t1", "t2", "flair")


def small(kind: str, size: int = 64, **kw) -> ModelConfig:
    labels = {"labels": LABELS} if kind == "cvae" else {}
    return ModelConfig(kind=kind, image_size=size, **(SMALL | labels | kw))


def cond_for(kind: str, n: int):
    """A conditional model's label per image (None for the others)."""
    return torch.arange(n) % len(LABELS) if kind == "cvae" else None


def weights_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("kind", MODEL_KINDS)
@pytest.mark.parametrize("size", [64, 128])
def test_every_kind_and_size_builds_with_matching_output_shapes(kind, size):
    model = build_model(small(kind, size))
    assert isinstance(model, AnomalyModel) and model.kind == kind
    x = torch.rand(3, 1, size, size)
    c = cond_for(kind, 3)
    out = model(x, torch.Generator().manual_seed(0), cond=c)
    assert out.recon.shape == x.shape
    assert out.code.shape == (3, 8)
    assert float(out.recon.detach().min()) >= 0.0 and float(out.recon.detach().max()) <= 1.0
    assert model.per_sample_loss(x, out).shape == (3,)
    assert model.reconstruct(x, c).shape == x.shape
    z = model.encode(x, c)
    assert z.shape == (3, 8)
    assert model.decode(z, c).shape == x.shape
    if kind in ("vae", "cvae", "hvae"):
        assert out.mu.shape == out.logvar.shape == (3, 8)
    else:
        assert out.mu is None and out.logvar is None


def test_256_pixels_and_several_input_channels():
    model = build_model(ModelConfig(kind="vae", image_size=256, in_channels=2, channels=(4, 8, 8, 8, 8), groups=4))
    x = torch.rand(2, 2, 256, 256)
    assert model(x).recon.shape == x.shape
    assert model.image_shape == (2, 256, 256)


@pytest.mark.parametrize("kind", MODEL_KINDS)
@pytest.mark.parametrize("size", [64, 128, 256])
def test_default_architecture_passes_the_opacus_validator(kind, size):
    model = build_model(ModelConfig(kind=kind, image_size=size, labels=LABELS if kind == "cvae" else ()))
    assert ModuleValidator.validate(model, strict=False) == []
    banned = (nn.BatchNorm1d, nn.BatchNorm2d, nn.ConvTranspose2d, nn.InstanceNorm2d)
    assert not any(isinstance(m, banned) for m in model.modules())


@pytest.mark.parametrize("size", [32, 100, 512])
def test_unsupported_image_size_is_a_clear_config_error(size):
    with pytest.raises(ConfigError, match="image_size must be one of 64, 128, 256"):
        build_model(ModelConfig(image_size=size))


def test_other_invalid_configs_are_config_errors():
    with pytest.raises(ConfigError, match="groups=3 must divide"):
        build_model(ModelConfig(groups=3))
    with pytest.raises(ConfigError, match="too many"):
        build_model(ModelConfig(channels=(8,) * 7))
    with pytest.raises(ConfigError, match="kind"):
        build_model(ModelConfig(kind="gan"))  # type: ignore[arg-type]


def test_same_seed_same_weights_different_seed_different_weights():
    cfg = small("vae")
    assert weights_equal(build_model(cfg, seed=3), build_model(cfg, seed=3))
    assert not weights_equal(build_model(cfg, seed=3), build_model(cfg, seed=4))


def test_initialisation_does_not_touch_global_rng():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    build_model(small("ae"), seed=0)
    assert torch.equal(torch.rand(1), before)


def test_vae_sample_shape_and_determinism():
    model = build_model(small("vae"), seed=0)
    a = model.sample(5, torch.Generator().manual_seed(1))
    b = model.sample(5, torch.Generator().manual_seed(1))
    c = model.sample(5, torch.Generator().manual_seed(2))
    assert a.shape == (5, 1, 64, 64)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_vae_samples_in_training_and_uses_the_mean_in_eval():
    model = build_model(small("vae"), seed=0)
    x = torch.rand(2, 1, 64, 64)
    model.train()
    z1 = model(x, torch.Generator().manual_seed(1)).code
    z2 = model(x, torch.Generator().manual_seed(2)).code
    assert not torch.equal(z1, z2)
    model.eval()
    out = model(x, torch.Generator().manual_seed(1))
    assert torch.equal(out.code, out.mu)
    assert torch.allclose(model.reconstruct(x), out.recon)


def test_vae_loss_is_mse_plus_scaled_kl_and_scoring_helpers():
    x = torch.rand(4, 1, 64, 64)
    m0 = build_model(small("vae", beta=0.0), seed=0).eval()
    m1 = build_model(small("vae", beta=2.0), seed=0).eval()
    out = m0(x)
    mse = (out.recon - x).pow(2).flatten(1).mean(1)
    assert torch.allclose(m0.per_sample_loss(x, out), mse)
    kl = m1.kl_per_sample(x)
    assert kl.shape == (4,) and bool((kl >= 0).all())
    assert torch.allclose(m1.per_sample_loss(x, out), mse + 2.0 * kl / x[0].numel())
    err, kl2 = m1.elbo_terms(x)
    assert err.shape == x.shape and torch.allclose(kl, kl2)
    assert isinstance(m1, VariationalAutoEncoder)


def test_sae_loss_adds_l1_on_the_code():
    x = torch.rand(4, 1, 64, 64)
    m = build_model(small("sae", sparsity_weight=0.5), seed=0)
    out = m(x)
    mse = (out.recon - x).pow(2).flatten(1).mean(1)
    assert torch.allclose(m.per_sample_loss(x, out), mse + 0.5 * out.code.abs().mean(1))


def test_dae_corrupts_only_in_training_and_deterministically():
    model = build_model(small("dae", noise_std=0.1, coarse_noise_std=0.3, coarse_noise_res=8))
    x = torch.rand(2, 1, 64, 64)
    model.train()
    a = model.corrupt(x, torch.Generator().manual_seed(0))
    b = model.corrupt(x, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and not torch.equal(a, x) and torch.equal(a, b)
    # The coarse component makes the noise spatially correlated.
    noise = (a - x)[0, 0]
    assert torch.corrcoef(torch.stack([noise[:, :-1].flatten(), noise[:, 1:].flatten()]))[0, 1] > 0.3
    model.eval()
    assert torch.equal(model.corrupt(x, torch.Generator().manual_seed(0)), x)


@pytest.mark.parametrize("kind", ["ae", "vae", "sae"])
def test_other_kinds_never_corrupt(kind):
    model = build_model(small(kind)).train()
    x = torch.rand(2, 1, 64, 64)
    assert torch.equal(model.corrupt(x, torch.Generator().manual_seed(0)), x)


def test_upsample2x_equals_nearest_interpolation():
    x = torch.rand(2, 3, 5, 5)
    ref = nn.functional.interpolate(x, scale_factor=2, mode="nearest")
    assert torch.equal(Upsample2x()(x), ref)


def test_subpixel_conv_starts_as_nearest_upsampling_icnr():
    model = build_model(small("ae"))
    sub = next(m for m in model.modules() if isinstance(m, SubPixelConv))
    x = torch.rand(1, sub.conv.in_channels, 6, 6)
    y = sub(x)
    assert torch.allclose(y, Upsample2x()(y[:, :, ::2, ::2]))


@pytest.mark.parametrize("kind", ["cvae", "hvae"])
def test_the_new_vaes_are_deterministic_for_a_seed_and_sample_from_their_priors(kind):
    a, b, other = build_model(small(kind), seed=3), build_model(small(kind), seed=3), build_model(small(kind), seed=4)
    assert weights_equal(a, b) and not weights_equal(a, other)
    c = cond_for(kind, 4)
    s1 = a.sample(4, torch.Generator().manual_seed(1), cond=c)
    s2 = b.sample(4, torch.Generator().manual_seed(1), cond=c)
    assert s1.shape == (4, 1, 64, 64) and torch.equal(s1, s2)


def test_a_cvae_translates_by_decoding_its_code_with_another_label():
    model = build_model(small("cvae"), seed=0).eval()
    with torch.no_grad():
        for film in model.film:  # trained FiLM layers are not zero; the label must change the image
            film.weight.normal_(0.0, 0.5)
    x = torch.rand(2, 1, 64, 64)
    t1, t2 = torch.zeros(2, dtype=torch.long), torch.ones(2, dtype=torch.long)
    same = model.translate(x, t1, t1)
    assert torch.allclose(same, model.reconstruct(x, t1))
    assert not torch.allclose(model.translate(x, t1, t2), same, atol=1e-4)
    with pytest.raises(ConfigError, match="label"):
        model.reconstruct(x)  # no labels
    with pytest.raises(ConfigError, match=r"\[0, 3\)"):
        model.reconstruct(x, torch.tensor([0, 3]))


def test_a_cvae_needs_labels_and_an_hvae_three_stages():
    with pytest.raises(ConfigError, match="at least two model.labels"):
        ModelConfig(kind="cvae")
    with pytest.raises(ConfigError, match="takes no labels"):
        ModelConfig(kind="vae", labels=("t1", "t2"))
    with pytest.raises(ConfigError, match="at least 3 stride-2 stages"):
        build_model(ModelConfig(kind="hvae", channels=(8, 16), groups=4))


def test_the_hvae_loss_counts_the_spatial_codes_kl():
    model = build_model(small("hvae"), seed=0).train()
    x = torch.rand(2, 1, 64, 64)
    out = model(x, torch.Generator().manual_seed(0))
    assert out.kl.shape == (2,) and bool((out.kl >= 0).all())
    flat = VariationalAutoEncoder.per_sample_loss(model, x, out)
    assert torch.allclose(model.per_sample_loss(x, out) - flat, model.cfg.beta * out.kl / x[0].numel())
