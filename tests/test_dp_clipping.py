"""Book-keeping clipper: exact per-sample norms and clipped sums, or a clear refusal."""

import pytest
import torch
from torch import nn

from medae_core.config import ModelConfig
from medae_core.dp_clipping import BookKeepingClipper, UnsupportedModelError, clip_factors
from medae_core.models import build_model

torch.set_num_threads(1)


def per_sample_reference(model, x, loss_fn, max_grad_norm):
    params = [p for p in model.parameters() if p.requires_grad]
    losses = loss_fn(model(x), x)
    total = [torch.zeros_like(p) for p in params]
    norms = []
    for i in range(x.shape[0]):
        grads = torch.autograd.grad(losses[i], params, retain_graph=True)
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        norms.append(norm)
        for t, g in zip(total, grads):
            t += clip_factors(norm, max_grad_norm) * g
    return total, torch.stack(norms)


class Mixed(nn.Module):
    """Strided, dilated, bias-free and 1x1 convs, GroupNorm and Linear layers."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 6, 3, stride=2, padding=1)
        self.gn = nn.GroupNorm(3, 6)
        self.c2 = nn.Conv2d(6, 4, 3, padding=2, dilation=2, bias=False)
        self.c3 = nn.Conv2d(4, 8, 1)
        self.fc = nn.Linear(8 * 8 * 8, 5)

    def forward(self, x):
        h = torch.tanh(self.gn(self.c1(x)))
        h = self.c3(torch.relu(self.c2(h)))
        return self.fc(h.flatten(1))


def mixed_loss(out, x):
    return out.pow(2).sum(1) + out[:, 0] * x.mean((1, 2, 3))


@pytest.mark.parametrize("strategy", ["auto", "ghost", "materialize", "shift"])
def test_norms_and_clipped_sum_match_per_sample_autograd(strategy):
    torch.manual_seed(0)
    model = Mixed().double()
    x = torch.randn(5, 2, 16, 16, dtype=torch.float64)
    _, raw = per_sample_reference(model, x, mixed_loss, 1e9)
    clip = float(raw.median())
    ref, ref_norms = per_sample_reference(model, x, mixed_loss, clip)
    clipper = BookKeepingClipper(model, clip, strategy=strategy)
    norms = clipper.backward(mixed_loss(clipper.forward(x), x))
    assert torch.allclose(norms, ref_norms, rtol=1e-10)
    for p, r in zip(model.parameters(), ref):
        assert torch.allclose(p.grad, r, rtol=1e-9, atol=1e-12)
    clipper.close()
    assert all(not m._forward_hooks for m in model.modules())


def test_clipped_sum_bounds_every_sample_contribution():
    model = build_model(ModelConfig(kind="ae", channels=(8, 16), latent_dim=8, groups=4), seed=0)
    x = torch.rand(3, 1, 64, 64)
    clipper = BookKeepingClipper(model, 1e-4)
    for i in range(3):  # one sample at a time: its clipped gradient has norm <= C
        out = clipper.forward(x[i : i + 1])
        clipper.backward(model.per_sample_loss(x[i : i + 1], out))
        total = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters()))
        assert float(total) <= 1e-4 * (1 + 1e-5)
    clipper.close()


def test_weights_get_no_autograd_gradient_during_the_pass():
    model = Mixed()
    clipper = BookKeepingClipper(model, 1.0)
    out = clipper.forward(torch.randn(2, 2, 16, 16))
    assert not any(p.grad is not None for p in model.parameters())
    loss = mixed_loss(out, torch.zeros(2, 1, 1, 1))
    clipper.backward(loss)
    assert all(p.grad is not None for p in model.parameters())


def test_unsupported_layers_are_refused_clearly():
    with pytest.raises(UnsupportedModelError, match="LayerNorm"):
        BookKeepingClipper(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), 1.0)
    with pytest.raises(UnsupportedModelError, match="groups=1"):
        BookKeepingClipper(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)), 1.0)


def test_weight_tying_is_refused():
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.Tanh(), lin)
    clipper = BookKeepingClipper(model, 1.0)
    with pytest.raises(UnsupportedModelError, match="twice"):
        clipper.forward(torch.randn(2, 4))


def per_unit_reference(model, x, k, max_grad_norm, clipping="flat"):
    """Explicit per-patient DP sum: for each unit, autograd of the MEAN loss of its k rows, clipped."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    norms = []
    for u in range(x.shape[0] // k):
        xs = x[u * k : (u + 1) * k]
        loss = model.per_sample_loss(xs, model(xs)).mean()
        grads = torch.autograd.grad(loss, params)
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        norms.append(norm)
        for t, g in zip(total, grads):
            t += clip_factors(norm, max_grad_norm, clipping) * g
    return total, torch.stack(norms)


@pytest.mark.parametrize("clipping", ["flat", "automatic"])
@pytest.mark.parametrize("strategy", ["auto", "ghost", "materialize", "shift"])
def test_multi_slice_units_match_an_explicit_per_patient_computation(strategy, clipping):
    torch.manual_seed(0)
    model = build_model(ModelConfig(kind="ae", channels=(8, 16), latent_dim=8, groups=4), seed=0).double()
    k = 3
    x = torch.rand(4 * k, 1, 64, 64, dtype=torch.float64)
    _, raw = per_unit_reference(model, x, k, 1e9)
    clip = float(raw.median())  # half the patients are clipped
    ref, ref_norms = per_unit_reference(model, x, k, clip, clipping)
    clipper = BookKeepingClipper(model, clip, strategy=strategy, group_size=k, clipping=clipping)
    norms = clipper.backward(model.per_sample_loss(x, clipper.forward(x)))
    clipper.close()
    assert norms.shape == (4,)
    assert torch.allclose(norms, ref_norms, rtol=1e-9)
    for p, r in zip(model.parameters(), ref):
        assert torch.allclose(p.grad, r, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("clipping", ["flat", "automatic"])
def test_a_patients_contribution_is_bounded_by_c_however_many_slices_it_has(clipping):
    model = build_model(ModelConfig(kind="ae", channels=(8, 16), latent_dim=8, groups=4), seed=0)
    for k in (1, 4, 8):
        x = torch.rand(k, 1, 64, 64) * 3  # one patient, k slices, large gradients
        clipper = BookKeepingClipper(model, 1e-3, group_size=k, clipping=clipping)
        norms = clipper.backward(model.per_sample_loss(x, clipper.forward(x)))
        clipper.close()
        total = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters()))
        assert float(norms[0]) > 1e-3  # it was clipped ...
        assert float(total) <= 1e-3 * (1 + 1e-5)  # ... to at most C


def test_a_batch_that_is_not_whole_units_is_refused():
    model = build_model(ModelConfig(kind="ae", channels=(8, 16), latent_dim=8, groups=4), seed=0)
    clipper = BookKeepingClipper(model, 1.0, group_size=3)
    x = torch.rand(4, 1, 64, 64)
    with pytest.raises(ValueError, match="whole number of units"):
        clipper.backward(model.per_sample_loss(x, clipper.forward(x)))
    clipper.close()


@pytest.mark.parametrize("kernel,padding", [(3, 1), (1, 0), ((3, 5), (1, 2)), (3, 0), (5, 3)])
def test_shifted_windows_give_the_per_sample_weight_gradients(kernel, padding):
    from medae_core.dp_clipping import _conv_per_sample_weight_grad, _shifted_per_sample_weight_grad

    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, kernel, padding=padding).double()
    a = torch.randn(5, 3, 10, 13, dtype=torch.float64)
    g = torch.randn_like(conv(a))
    shifted = _shifted_per_sample_weight_grad(conv, a, g)
    assert shifted.shape == (5, *conv.weight.shape)
    assert torch.allclose(shifted, _conv_per_sample_weight_grad(conv, a, g), rtol=1e-10, atol=1e-12)
    # and per sample, what autograd gives for that sample alone
    ref = torch.autograd.grad((conv(a[1:2]) * g[1:2]).sum(), conv.weight)[0]
    assert torch.allclose(shifted[1], ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("stride", [1, 2])
def test_a_units_weight_gradient_is_its_rows_summed(stride):
    """Units of k consecutive rows: one gradient each, the sum of what its rows give alone."""
    from medae_core.dp_clipping import _conv_per_sample_weight_grad, _shifted_per_sample_weight_grad

    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, stride=stride).double()
    a = torch.randn(6, 3, 10, 12, dtype=torch.float64)
    g = torch.randn_like(conv(a))
    rows = _conv_per_sample_weight_grad(conv, a, g)
    ways = [_conv_per_sample_weight_grad] + ([_shifted_per_sample_weight_grad] if stride == 1 else [])
    for k in (2, 3):
        expected = rows.reshape(6 // k, k, *conv.weight.shape).sum(1)
        for per_unit in ways:
            assert torch.allclose(per_unit(conv, a, g, k), expected, rtol=1e-10, atol=1e-12), (per_unit, k)


@pytest.mark.parametrize("kernel,padding", [(3, 1), (1, 0), ((3, 5), (1, 2)), (3, 0)])
def test_the_patch_gram_matrix_by_shifted_windows_is_the_one_from_im2col(kernel, padding):
    """Ghost norms of a stride-1 conv read the patches' inner products off one Gram matrix of pixels."""
    from medae_core.dp_clipping import _shifted_gram, _unfolded_gram

    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, kernel, padding=padding).double()
    a = torch.randn(6, 3, 9, 11, dtype=torch.float64)
    positions = conv(a[:1]).shape[2:].numel()
    for k in (1, 2, 3):
        shifted, unfolded = _shifted_gram(conv, a, k), _unfolded_gram(conv, a, k)
        assert shifted.shape == unfolded.shape == (6 // k, k * positions, k * positions)
        assert torch.allclose(shifted, unfolded, rtol=1e-10, atol=1e-10), k


def test_group_norm_statistics_come_from_the_forward_pass_and_equal_a_recomputation():
    from medae_core import dp_clipping

    torch.manual_seed(0)
    model = Mixed().double()
    x = torch.randn(4, 2, 16, 16, dtype=torch.float64)
    clipper = BookKeepingClipper(model, 1.0)
    out = clipper.forward(x)
    (record,) = [r for r in clipper._records if isinstance(r.module, nn.GroupNorm)]
    assert record.stats is not None  # kept from the forward pass, not recomputed
    n, c = record.a.shape[:2]
    _, mean, rstd = torch.native_group_norm(record.a, None, None, n, c, record.a[0, 0].numel(), 3, 1e-5)
    assert torch.equal(record.stats[0], mean) and torch.equal(record.stats[1], rstd)
    g = torch.randn_like(record.a)
    kept = dp_clipping._group_norm_per_sample_grads(record.module, record.a, g, record.stats)
    again = dp_clipping._group_norm_per_sample_grads(record.module, record.a, g)
    assert all(torch.equal(u, v) for u, v in zip(kept, again))
    clipper.backward(mixed_loss(out, x))
    clipper.close()


def test_auto_uses_shifted_windows_for_the_layers_next_to_the_image():
    model = build_model(ModelConfig(kind="ae"), seed=0)
    clipper = BookKeepingClipper(model, 1.0)
    out = model.decoder.features[-1].conv  # 16 -> 4 channels at half the image size, stride 1
    first = model.encoder.features[0]  # stride 2: not shiftable
    g_out = torch.zeros(16, out.out_channels, 32, 32)
    assert clipper._conv_method(out, g_out) == "shift"
    assert clipper._conv_method(first, torch.zeros(16, 16, 32, 32)) == "grouped"
    clipper.close()
