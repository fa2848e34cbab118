"""Training engine: plans, privacy units, exact DP step counts, clipping, clean models."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from medae_core.config import ModelConfig, PrivacyConfig, RunConfig, TrainConfig
from medae_core.errors import ConfigError, DataError, MedaeError
from medae_core.models import build_model
from medae_core.devices import resolve_device
from medae_core.dp_step import privatized_gradient, resolve_grad_sample_mode
from medae_core.scoring import run_model
from medae_core.training import evaluate_loss, train
from medae_core.units import ImageDataset, PatientSliceDataset, make_unit_dataset, plan_training

torch.set_num_threads(1)

MODEL = ModelConfig(kind="ae", channels=(8, 16), latent_dim=8, groups=4)


def run_cfg(kind="ae", unit="patient", mode="auto", epochs=2, batch_size=4, lr=3e-3, seed=0) -> RunConfig:
    return RunConfig(
        model=ModelConfig(kind=kind, channels=MODEL.channels, latent_dim=MODEL.latent_dim, groups=MODEL.groups),
        train=TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device="cpu", num_threads=1),
        # Opacus' own modes clip flat only; book-keeping ("auto", "bk") takes the default (automatic).
        privacy=PrivacyConfig(unit=unit, grad_sample_mode=mode, max_grad_norm=1.0,
                              clipping="automatic" if mode in ("auto", "bk") else "flat"),
    )


def synthetic(n_patients=8, per_patient=3, size=64, seed=0):
    """Smooth blobs (learnable) grouped by patient."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    images = []
    for _ in range(n_patients * per_patient):
        cx, cy, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.3)
        images.append(np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r**2)))
    return np.asarray(images, dtype=np.float32), np.repeat(np.arange(n_patients), per_patient)


def no_opacus_traces(model: nn.Module) -> bool:
    for m in model.modules():
        if m._forward_hooks or m._backward_hooks or m._forward_pre_hooks:
            return False
        if getattr(m, "_backward_pre_hooks", None):
            return False
    attrs = ("grad_sample", "summed_grad", "_forward_counter", "_current_grad_sample", "_norm_sample")
    return not any(hasattr(p, a) for p in model.parameters() for a in attrs)


# -- devices and plans -----------------------------------------------------------
def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(MedaeError, match="CUDA is not available"):
            resolve_device("cuda:1")


def test_plan_uses_exact_integer_steps_and_caps_the_sample_rate():
    plan = plan_training(30, TrainConfig(batch_size=10), epochs=2)
    assert plan.sample_rate == pytest.approx(1 / 3)
    assert plan.steps_per_epoch == 3 and plan.steps == 6  # not ceil(1/(10/30)) = 4
    plan = plan_training(31, TrainConfig(batch_size=10), epochs=1)
    assert plan.steps == 4 and plan.sample_rate == pytest.approx(10 / 31)
    plan = plan_training(5, TrainConfig(batch_size=32), epochs=3)
    assert plan.sample_rate == 1.0 and plan.steps == 3 and plan.expected_batch_size == 5
    with pytest.raises(DataError):
        plan_training(0, TrainConfig(), epochs=1)
    with pytest.raises(ConfigError):
        plan_training(10, TrainConfig(), epochs=0)


# -- privacy units -------------------------------------------------------------
def test_patient_dataset_yields_one_slice_of_each_sampled_patient_per_step():
    images, _ = synthetic(n_patients=1, per_patient=1)
    images = np.repeat(images, 12, axis=0)
    patients = np.array([5, 5, 9, 9, 9, 9, 2, 7, 7, 7, 7, 7])  # uneven, unsorted ids
    ds = PatientSliceDataset(images, patients, seed=0)
    assert len(ds) == 4 and list(ds.slices_per_patient()) == [1, 2, 5, 4]  # ids 2, 5, 7, 9
    order = np.unique(patients)
    units = torch.tensor([0, 2, 3])
    seen = {int(u): set() for u in units}
    for step in range(40):
        ids = ds.slice_ids(units, step)
        assert len(ids) == len(units)  # exactly one slice per sampled patient
        for u, i in zip(units, ids):
            assert patients[int(i)] == order[int(u)]  # ... and it is that patient's slice
            seen[int(u)].add(int(i))
    assert seen[0] == {6} and len(seen[3]) == 4  # draws vary across steps and cover the patient
    assert torch.equal(ds.slice_ids(units, 7), PatientSliceDataset(images, patients, seed=0).slice_ids(units, 7))
    assert ds.batch(units, 0).shape == (3, 1, 64, 64)


def test_unit_dataset_choice_follows_the_privacy_unit():
    images, patients = synthetic(n_patients=3, per_patient=2)
    assert isinstance(make_unit_dataset(images, patients, PrivacyConfig(unit="image")), ImageDataset)
    ds = make_unit_dataset(images, patients, PrivacyConfig(unit="patient"))
    assert isinstance(ds, PatientSliceDataset) and len(ds) == 3


def test_dp_with_patient_unit_uses_every_patient_once_per_step_at_rate_one():
    images, patients = synthetic(n_patients=5, per_patient=3)
    cfg = run_cfg(batch_size=8)  # > 5 patients: sample rate 1, every patient every step
    plan = plan_training(5, cfg.train, epochs=3)
    result = train(build_model(cfg.model), images, patients, plan, cfg, noise_multiplier=1.0, dp_seed=0)
    assert plan.sample_rate == 1.0 and result.steps_taken == 3
    assert result.num_examples == 3 * 5  # one slice per patient per step


# -- training ------------------------------------------------------------------
def test_non_dp_training_reduces_the_loss():
    images, patients = synthetic()
    cfg = run_cfg(unit="image", epochs=4, batch_size=8, lr=1e-2)
    model = build_model(cfg.model, seed=0)
    before = evaluate_loss(model, images, "cpu")
    plan = plan_training(len(images), cfg.train, cfg.train.epochs)
    result = train(model, images, patients, plan, cfg, noise_multiplier=None)
    after = evaluate_loss(model, images, "cpu")
    assert after < 0.7 * before
    assert result.grad_sample_mode == "none" and result.steps_taken == plan.steps
    assert result.losses[-1] < result.losses[0]
    assert result.opacus_epsilon(1e-5) == 0.0


@pytest.mark.parametrize("mode", ["bk", "hooks"])
def test_dp_training_takes_exactly_the_planned_steps_even_with_empty_batches(mode):
    images, patients = synthetic(n_patients=40, per_patient=1)
    cfg = run_cfg(unit="image", mode=mode, epochs=1, batch_size=1)  # q = 1/40: many empty batches
    plan = plan_training(40, cfg.train, epochs=1)
    calls = []
    result = train(
        build_model(cfg.model), images, patients, plan, cfg,
        noise_multiplier=1.0, dp_seed=3, progress=lambda done, total: calls.append((done, total)),
    )
    assert result.steps_taken == plan.steps == 40
    assert calls[-1] == (40, 40) and len(calls) == 40
    assert result.empty_steps > 0  # q = 1/40: P(empty) ~ 0.36 per step; seeded
    assert result.num_examples > 0
    assert sum(k for _, _, k in result.accountant_history) == 40
    assert result.accountant_history[0][:2] == (1.0, pytest.approx(1 / 40))
    eps = result.opacus_epsilon(1e-5)
    assert math.isfinite(eps) and eps > 0


def test_auto_mode_picks_book_keeping_for_medae_models_and_hooks_otherwise():
    assert resolve_grad_sample_mode("auto", build_model(MODEL)) == "bk"
    other = nn.Sequential(nn.Conv2d(1, 2, 3), nn.LayerNorm([2, 2, 2]))
    assert resolve_grad_sample_mode("auto", other) == "hooks"
    with pytest.raises(ConfigError, match="grad_sample_mode"):
        resolve_grad_sample_mode("fast", other)


def reference_clipped_mean(model, x, gen_seed, max_grad_norm):
    """Per-sample gradients one sample at a time, clipped explicitly, averaged."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = model(x, torch.Generator().manual_seed(gen_seed))
    losses = model.per_sample_loss(x, out)
    total = [torch.zeros_like(p) for p in params]
    norms = []
    for i in range(x.shape[0]):
        grads = torch.autograd.grad(losses[i], params, retain_graph=True)
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        norms.append(float(norm))
        factor = min(1.0, max_grad_norm / (float(norm) + 1e-6))
        for t, g in zip(total, grads):
            t += factor * g
    return [t / x.shape[0] for t in total], norms


@pytest.mark.parametrize("kind", ["vae", "sae"])
@pytest.mark.parametrize("mode", ["auto", "hooks", "ghost"])
def test_clipped_gradient_matches_a_per_sample_reference(kind, mode):
    torch.manual_seed(0)
    model = build_model(ModelConfig(kind=kind, channels=(8, 16), latent_dim=8, groups=4), seed=1).double()
    x = torch.rand(6, 1, 64, 64, dtype=torch.float64)
    _, norms = reference_clipped_mean(model, x, 5, 1e9)
    clip = float(np.median(norms))  # half the samples clipped, half not
    ref, _ = reference_clipped_mean(model, x, 5, clip)
    got = privatized_gradient(
        model, x, grad_sample_mode=mode, max_grad_norm=clip, noise_multiplier=0.0,
        generator=torch.Generator().manual_seed(5),
    )
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert torch.allclose(g, r, rtol=1e-6, atol=1e-9 * float(r.abs().max()) + 1e-12)
    assert no_opacus_traces(model)


def test_noise_has_the_calibrated_scale():
    model = build_model(MODEL, seed=0)
    x = torch.rand(4, 1, 64, 64)
    clean = privatized_gradient(model, x, grad_sample_mode="auto", max_grad_norm=0.5, noise_multiplier=0.0)
    noisy = privatized_gradient(
        model, x, grad_sample_mode="auto", max_grad_norm=0.5, noise_multiplier=2.0,
        expected_batch_size=4,
    )
    diff = torch.cat([(n - c).flatten() for n, c in zip(noisy, clean)])
    assert float(diff.std()) == pytest.approx(2.0 * 0.5 / 4, rel=0.05)


@pytest.mark.parametrize("mode", ["bk", "ghost"])
def test_every_parameter_gets_its_own_noise_of_the_calibrated_scale(mode):
    # bk and ghost draw the noise of all tensors in one call and split it (dp_step's optimizer):
    # each coordinate must still get its own N(0, (σC)²), none left out, none shared.
    model = build_model(MODEL, seed=0)
    x = torch.rand(4, 1, 64, 64)
    clean = privatized_gradient(model, x, grad_sample_mode=mode, max_grad_norm=0.5, noise_multiplier=0.0)
    noisy = privatized_gradient(model, x, grad_sample_mode=mode, max_grad_norm=0.5, noise_multiplier=2.0,
                                expected_batch_size=4)
    noise = [(n - c).flatten() for n, c in zip(noisy, clean)]
    std = 2.0 * 0.5 / 4
    for z in noise:
        assert bool((z != 0).all())
        if z.numel() >= 2000:
            assert float(z.std()) == pytest.approx(std, rel=0.1)
    heads = [z[:8] for z in noise if z.numel() >= 8]
    assert len(heads) > 10
    assert all(not torch.allclose(a, b) for i, a in enumerate(heads) for b in heads[i + 1:])
    everything = torch.cat(noise)
    assert abs(float(torch.corrcoef(torch.stack([everything[:-1], everything[1:]]))[0, 1])) < 0.01


@pytest.mark.parametrize("mode", ["auto", "hooks", "ghost", "ew"])
def test_original_model_keeps_clean_keys_and_can_be_retrained_and_scored(mode):
    images, patients = synthetic(n_patients=6, per_patient=2)
    cfg = run_cfg(kind="vae", mode=mode, epochs=1)
    model = build_model(cfg.model, seed=0)
    keys = list(model.state_dict())
    plan = plan_training(6, cfg.train, epochs=1)
    first = train(model, images, patients, plan, cfg, noise_multiplier=0.8, dp_seed=1)
    assert list(model.state_dict()) == keys and list(first.state_dict) == keys
    assert not any(k.startswith("_module") for k in first.state_dict)
    assert no_opacus_traces(model)
    assert all(p.grad is None for p in model.parameters())
    second = train(model, images, patients, plan, cfg, noise_multiplier=0.8, dp_seed=2)
    assert second.steps_taken == plan.steps
    assert any(not torch.equal(first.state_dict[k], second.state_dict[k]) for k in keys)
    assert torch.equal(second.state_dict[keys[0]], model.state_dict()[keys[0]])
    assert no_opacus_traces(model)
    rec, _ = run_model(model, images[:3], "cpu")
    assert rec.shape == (3, 64, 64) and rec.dtype == np.float32


def test_training_is_deterministic_for_a_fixed_seed_on_cpu():
    images, patients = synthetic()
    cfg = run_cfg(kind="dae", epochs=2)
    plan = plan_training(8, cfg.train, epochs=2)

    def run(noise, dp_seed=None, seed=None):
        model = build_model(cfg.model, seed=0)
        train(model, images, patients, plan, cfg, noise_multiplier=noise, dp_seed=dp_seed, seed=seed)
        return model.state_dict()

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    assert same(run(None), run(None))
    assert not same(run(None), run(None, seed=1))
    assert same(run(1.0, dp_seed=7), run(1.0, dp_seed=7))
    # Without an explicit dp_seed the sampler and noise come from OS entropy.
    assert not same(run(1.0), run(1.0))


def test_fedprox_term_pulls_towards_the_starting_weights():
    images, patients = synthetic()
    cfg = run_cfg(unit="image", epochs=2, lr=1e-2)
    plan = plan_training(len(images), cfg.train, epochs=2)

    def drift(mu, noise):
        model = build_model(cfg.model, seed=0)
        start = [p.detach().clone() for p in model.parameters()]
        train(model, images, patients, plan, cfg, noise_multiplier=noise, proximal_mu=mu, dp_seed=0)
        return sum(float((p.detach() - s).pow(2).sum()) for p, s in zip(model.parameters(), start))

    assert drift(1000.0, None) < drift(0.0, None)
    assert drift(1000.0, 0.5) < drift(0.0, 0.5)


def test_train_rejects_inconsistent_inputs():
    images, patients = synthetic(n_patients=4, per_patient=2)
    cfg = run_cfg()
    model = build_model(cfg.model)
    with pytest.raises(DataError, match="plan"):
        train(model, images, patients, plan_training(5, cfg.train, 1), cfg, noise_multiplier=1.0)
    with pytest.raises(DataError, match="expects"):
        train(model, images[:, :32, :32], patients, plan_training(4, cfg.train, 1), cfg, noise_multiplier=1.0)
    with pytest.raises(ConfigError, match="noise_multiplier"):
        train(model, images, patients, plan_training(4, cfg.train, 1), cfg, noise_multiplier=-1.0)


# -- fewer private parameters, more slices per patient -----------------------------
def test_frozen_parameters_are_bit_identical_after_dp_training_and_get_no_noise():
    images, patients = synthetic(n_patients=8, per_patient=3)
    cfg = run_cfg(epochs=2).with_overrides({"train.trainable": "decoder"})
    model = build_model(cfg.model, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = plan_training(8, cfg.train, epochs=2)
    result = train(model, images, patients, plan, cfg, noise_multiplier=5.0, dp_seed=3)
    decoder = [k for k in before if k.startswith("decoder.")]
    encoder = [k for k in before if k.startswith("encoder.")]
    assert result.trained_parameters == sum(before[k].numel() for k in decoder)
    assert all(torch.equal(result.state_dict[k], before[k]) for k in encoder)  # bit for bit
    assert all(not torch.equal(result.state_dict[k], before[k]) for k in decoder if k.endswith("weight"))
    assert all(p.requires_grad for p in model.parameters())  # the model is left trainable

    # The noised gradient covers the trained parameters only: frozen ones get none at all.
    from medae_core.models import set_trainable

    set_trainable(model, "decoder")
    grads = privatized_gradient(model, torch.rand(4, 1, 64, 64), grad_sample_mode="auto",
                                max_grad_norm=1.0, noise_multiplier=3.0)
    assert len(grads) == len(decoder)
    assert all(p.grad is None for name, p in model.named_parameters() if name.startswith("encoder."))


def test_trainable_parts_select_what_they_name():
    from medae_core.models import set_trainable, trainable_mask

    model = build_model(ModelConfig(kind="vae", channels=(8, 16), latent_dim=8, groups=4), seed=0)
    norm = trainable_mask(model, "norm")
    assert norm["encoder.features.1.weight"] and not norm["encoder.features.0.weight"]
    assert all(v == k.endswith(".bias") for k, v in trainable_mask(model, "bias").items())
    both = trainable_mask(model, "norm, bias")
    assert sum(both.values()) == sum(norm[k] or k.endswith(".bias") for k in both)
    assert trainable_mask(model, "bottleneck")["decoder.fc.weight"]
    first, last = trainable_mask(model, "input"), trainable_mask(model, "output")
    assert [k for k, v in first.items() if v] == ["encoder.features.0.weight", "encoder.features.0.bias"]
    convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d)]
    assert [k for k, v in last.items() if v] == [f"{convs[-1]}.weight", f"{convs[-1]}.bias"]
    assert set_trainable(model, "all") == sum(p.numel() for p in model.parameters())
    with pytest.raises(ConfigError, match="train.trainable"):
        trainable_mask(model, "attention")


def test_patient_dataset_draws_k_distinct_stratified_slices_per_patient():
    images, patients = synthetic(n_patients=5, per_patient=6)
    ds = PatientSliceDataset(images, patients, seed=0, k=3)
    units = torch.tensor([0, 3, 4])
    ids = ds.slice_ids(units, step=7).view(3, 3)
    for row, patient in zip(ids, units):
        assert len(set(row.tolist())) == 3  # distinct
        assert all(patients[i] == patient for i in row.tolist())  # all of that patient
    assert ds.batch(units, step=7).shape == (9, 1, 64, 64)
    few = PatientSliceDataset(images[:2], np.zeros(2, int), seed=0, k=4)  # fewer slices than k
    assert sorted(few.slice_ids(torch.tensor([0]), 0).tolist()) == [0, 0, 1, 1]


def test_dp_training_with_several_slices_per_patient_counts_patients_not_slices():
    images, patients = synthetic(n_patients=8, per_patient=3)
    cfg = run_cfg(epochs=1).with_overrides({"train.slices_per_patient": 3})
    plan = plan_training(8, cfg.train, epochs=1)
    assert plan.n_units == 8
    result = train(build_model(cfg.model, seed=0), images, patients, plan, cfg, noise_multiplier=1.0, dp_seed=0)
    assert result.steps_taken == plan.steps
    assert result.num_examples % 3 == 0 and result.num_examples > 0


def test_opacus_modes_refuse_what_only_book_keeping_does():
    images, patients = synthetic(n_patients=4, per_patient=2)
    for over in ({"train.slices_per_patient": 2}, {"privacy.clipping": "automatic"}):
        cfg = run_cfg(mode="hooks", epochs=1).with_overrides(over)
        with pytest.raises(ConfigError, match="bk"):
            train(build_model(cfg.model, seed=0), images, patients, plan_training(4, cfg.train, 1), cfg,
                  noise_multiplier=1.0, dp_seed=0)


def test_augmentation_multiplicity_keeps_each_rows_views_together():
    from medae_core.units import augment_views

    x = torch.rand(4, 1, 16, 16)
    views = augment_views(x, 3, torch.Generator().manual_seed(0))
    assert views.shape == (12, 1, 16, 16)
    for i in range(4):
        assert torch.equal(views[3 * i], x[i])  # the original first ...
        for j in (1, 2):  # ... then mirrored, shifted copies of the same row
            copy = views[3 * i + j]
            assert any(torch.equal(torch.roll(torch.flip(x[i], (-1,)), (dy, dx), (-2, -1)), copy)
                       for dy in range(-3, 4) for dx in range(-3, 4))
    assert augment_views(x, 1, torch.Generator()) is x


def test_dp_training_with_slices_and_augmented_views_takes_the_planned_steps():
    images, patients = synthetic(n_patients=8, per_patient=3)
    cfg = run_cfg(epochs=1).with_overrides({"train.slices_per_patient": 2, "train.augment_multiplicity": 2})
    plan = plan_training(8, cfg.train, epochs=1)
    result = train(build_model(cfg.model, seed=0), images, patients, plan, cfg, noise_multiplier=1.0, dp_seed=0)
    assert result.steps_taken == plan.steps and result.num_examples % 4 == 0


def test_ema_returns_the_moving_average_of_the_iterates():
    images, patients = synthetic(n_patients=4, per_patient=1)
    cfg = run_cfg(unit="image", epochs=1, batch_size=4)  # one step
    plan = plan_training(4, cfg.train, epochs=1)
    start = build_model(cfg.model, seed=0)
    w0 = {k: v.clone() for k, v in start.state_dict().items()}
    plain = train(build_model(cfg.model, seed=0), images, None, plan, cfg, noise_multiplier=None).state_dict
    averaged = train(build_model(cfg.model, seed=0), images, None, plan,
                     cfg.with_overrides({"train.ema_decay": 0.75}), noise_multiplier=None).state_dict
    for k in w0:
        if w0[k].is_floating_point():
            assert torch.allclose(averaged[k], w0[k] + 0.25 * (plain[k] - w0[k]), atol=1e-6)
    with pytest.raises(ConfigError, match="ema_decay"):
        train(build_model(cfg.model, seed=0), images, None, plan, cfg.with_overrides({"train.ema_decay": 1.5}),
              noise_multiplier=None)


@pytest.mark.parametrize("kind", ["cvae", "hvae"])
@pytest.mark.parametrize("mode", ["auto", "hooks"])
def test_conditional_and_hierarchical_vaes_train_on_per_sample_clipped_gradients(kind, mode):
    """Issue 14: the new models' DP gradient is the clipped per-sample mean, the label included."""
    torch.manual_seed(0)
    labels = ("t1", "t2", "flair") if kind == "cvae" else ()
    model = build_model(ModelConfig(kind=kind, channels=(8, 16, 16), latent_dim=8, groups=4, labels=labels),
                        seed=1).double()
    if kind == "cvae":  # FiLM starts at zero; make the label matter from the first step
        with torch.no_grad():
            for film in model.film:
                film.weight.normal_(0.0, 0.3)
    x = torch.rand(6, 1, 64, 64, dtype=torch.float64)
    cond = torch.tensor([0, 1, 2, 2, 1, 0]) if kind == "cvae" else None
    params = [p for p in model.parameters() if p.requires_grad]
    out = model(x, torch.Generator().manual_seed(5), cond=cond)
    losses = model.per_sample_loss(x, out)
    grads = [torch.autograd.grad(losses[i], params, retain_graph=True) for i in range(6)]
    norms = [float(torch.sqrt(sum(g.pow(2).sum() for g in gs))) for gs in grads]
    clip = float(np.median(norms))
    ref = [sum(min(1.0, clip / (n + 1e-6)) * gs[j] for gs, n in zip(grads, norms)) / 6 for j in range(len(params))]
    got = privatized_gradient(model, x, grad_sample_mode=mode, max_grad_norm=clip, noise_multiplier=0.0,
                              generator=torch.Generator().manual_seed(5), cond=cond)
    for g, r in zip(got, ref):
        assert torch.allclose(g, r, rtol=1e-6, atol=1e-9 * float(r.abs().max()) + 1e-12)
    if kind == "cvae":  # the label reaches the weights: other labels, another gradient
        other = privatized_gradient(model, x, grad_sample_mode=mode, max_grad_norm=clip, noise_multiplier=0.0,
                                    generator=torch.Generator().manual_seed(5), cond=(cond + 1) % 3)
        assert not all(torch.allclose(a, b) for a, b in zip(got, other))
    assert no_opacus_traces(model)


def test_a_conditional_model_needs_labels_and_the_others_refuse_them():
    cfg = run_cfg(epochs=1)
    images, patients = synthetic()
    plan = plan_training(len(np.unique(patients)), cfg.train)
    cvae = build_model(ModelConfig(kind="cvae", channels=(8, 16), latent_dim=8, groups=4, labels=("t1", "t2")))
    with pytest.raises(DataError, match="needs image labels"):
        train(cvae, images, patients, plan, cfg, noise_multiplier=1.0)
    with pytest.raises(DataError, match="takes no image labels"):
        train(build_model(MODEL), images, patients, plan, cfg, noise_multiplier=1.0, cond=np.zeros(len(images)))
    result = train(cvae, images, patients, plan, cfg, noise_multiplier=1.0, cond=np.arange(len(images)) % 2)
    assert result.steps_taken == plan.steps
