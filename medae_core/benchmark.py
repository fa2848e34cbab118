"""Built-in synthetic brain-MRI anomaly benchmark, written as real DICOM (no download).

About 850 lines, on purpose: one pipeline (anatomy → scanner appearance → lesions →
DICOM files and labels) whose parameters are tuned against each other and read together.

Design in a few lines:

* Anatomy comes from the MNI152 2009 T1 template and its white-matter and brain masks
  that ship inside nilearn (2 mm grid, 99x117x95). Each synthetic patient is the template
  seen through a random global similarity transform (a few degrees, a few % of scale)
  plus a smooth random displacement field (Gaussian-filtered noise, a few mm).
* Only the output slices are computed (no 3-D patient volume is built): each pixel of
  a patient's axial slices, on the site's matrix, is mapped through the deformation and
  sampled with ``scipy.ndimage.map_coordinates``. Slices are evenly spaced between 40 %
  and 85 % of the template brain's head-foot extent (about -10 to +60 mm: basal ganglia
  to centrum semiovale; lower slices change wildly with head tilt and swamp the task).
* Lesions are analytic 3-D objects (rotated, slightly irregular ellipsoids with soft
  edges) placed in the patient's physical space, so neighbouring slices cut the same
  lesion. Kinds: ``bright_wm`` (MS-like, hyperintense, gated by the white-matter map),
  ``dark_wm`` (hypointense, gated the same way) and ``mass`` (larger, roughly spherical,
  brighter than white matter, half of them with a dark core, half with mild mass effect).
* Label rule: a lesion's mask is where its effective weight is >= 0.5. A lesion only
  touches a slice when its mask there has at least ``MIN_LESION_PIXELS`` pixels at the
  output resolution; otherwise it is left out of that slice completely (intensity, mask
  and mass effect), so there are no slivers: label 1 <=> mask has >= 10 pixels, label 0
  <=> the slice is untouched and has no mask.
* Each site is a scanner with its own appearance drawn from the seed: gamma, smooth
  multiplicative bias field, Rician or Gaussian noise, contrast scale/offset, field of
  view and matrix size, bits stored, rescale slope/intercept; every patient gets a small
  intensity jitter on top. Training patients are healthy. Test patients carry lesions
  in roughly 30-60 % of their slices (about half of all test slices; >= 2 lesions from
  6 slices per patient on), aimed at slice levels that are anomalous in few earlier
  patients so that the label does not go with slice level. Test patients alternate with
  and without a mass and white-matter lesions alternate bright/dark, so every site with
  >= 2 test patients and >= 6 slices per patient has all three kinds.
* Difficulty (seed 0, 3 sites x 24 patients, 64 px): a plain AE trained 25 epochs on one
  site reaches slice AUROC ~0.70-0.78 with the default scoring; an intensity threshold
  reaches ~1.0 on bright lesions, ~0.85-0.97 on masses and ~0.5 on dark lesions.
* Output follows the site layout contract (``SITE/train``, ``SITE/test``,
  ``SITE/test/labels.csv``, PNG masks) and is byte-for-byte reproducible from the seed.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.special import expit

from medae_core.errors import DataError

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1
LESION_KINDS = ("bright_wm", "dark_wm", "mass")
MIN_LESION_PIXELS = 10  # a slice is anomalous iff its lesion mask has at least this many pixels
MATRIX_SIZES = (96, 112, 128, 144)
FOV_MM = (200.0, 210.0, 220.0, 230.0)  # skull-stripped brain: no skull to fit in
SLOPES = (1.0, 0.5, 2.0, 0.25)
SLICE_RANGE = (0.4, 0.85)  # share of the template brain z extent: top of cerebellum to vertex-ish
WM_REFERENCE = 0.84  # mean template intensity in white matter
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
PUBLIC_STREAM = 6000  # offset of the public set's random streams (scanners and patients)
PUBLIC_SCANNERS = 4  # scanners the public set's patients are spread over
SITE_GAMMA = (0.7, 1.4)  # tissue-intensity gamma of the sites' scanners
PUBLIC_GAMMA = ((0.45, 0.65), (1.5, 1.8))  # the public scanners' (alternating): other contrasts

LABEL_RULE = (
    f"A lesion's mask is where its effective weight is >= 0.5. A lesion is drawn into a slice "
    f"only if its mask there has >= {MIN_LESION_PIXELS} pixels at the output resolution; "
    f"otherwise it is left out of that slice entirely (intensity, mask, mass effect). "
    f"label 1 = at least one lesion drawn (mask PNG non-empty, 255 = lesion); label 0 = "
    f"no lesion drawn and no mask."
)


# --------------------------------------------------------------------------- anatomy


@dataclass(frozen=True)
class _Anatomy:
    t1: np.ndarray  # float32, ~[0, 1]
    wm: np.ndarray  # float32 probability
    gm: np.ndarray  # float32 probability (CSF is the brain mask less GM and WM)
    brain: np.ndarray  # float32 {0, 1}
    affine: np.ndarray  # voxel -> RAS mm
    z_mm: tuple[float, float]  # brain extent along z (mm)
    center_lps: tuple[float, float]  # in-plane centre of the brain's bounding box (LPS mm)


@lru_cache(maxsize=1)
def _anatomy() -> _Anatomy:
    """Load the MNI152 2009 template shipped with nilearn (no network)."""
    from nilearn import datasets  # slow import; only when the benchmark is built

    t1_img = datasets.load_mni152_template(resolution=2)
    t1 = np.asarray(t1_img.get_fdata(), dtype=np.float32)
    wm = np.asarray(datasets.load_mni152_wm_template(resolution=2).get_fdata(), dtype=np.float32)
    gm = np.asarray(datasets.load_mni152_gm_template(resolution=2).get_fdata(), dtype=np.float32)
    brain = np.asarray(datasets.load_mni152_brain_mask(resolution=2).get_fdata(), dtype=np.float32)
    affine = np.asarray(t1_img.affine, dtype=np.float64)
    if not t1.shape == wm.shape == gm.shape == brain.shape:
        raise DataError(f"nilearn's MNI152 templates disagree in shape: {t1.shape}, {wm.shape}, {gm.shape}, "
                        f"{brain.shape}")
    t1 = np.clip(t1 / max(float(t1.max()), 1e-6), 0.0, 1.0)
    wm = np.clip(wm, 0.0, 1.0)
    gm = np.clip(gm, 0.0, 1.0)
    idx = np.nonzero(brain > 0.5)
    lo = np.array([i.min() for i in idx], dtype=np.float64)
    hi = np.array([i.max() for i in idx], dtype=np.float64)
    ras_lo = affine[:3, :3] @ lo + affine[:3, 3]
    ras_hi = affine[:3, :3] @ hi + affine[:3, 3]
    ras_c = (ras_lo + ras_hi) / 2
    return _Anatomy(
        t1=t1,
        wm=wm,
        gm=gm,
        brain=brain,
        affine=affine,
        z_mm=(float(min(ras_lo[2], ras_hi[2])), float(max(ras_lo[2], ras_hi[2]))),
        center_lps=(float(-ras_c[0]), float(-ras_c[1])),
    )


def _lps_to_voxel(anat: _Anatomy, pts: np.ndarray) -> np.ndarray:
    """(3, ...) LPS mm -> (3, ...) template voxel coordinates."""
    ras = np.stack([-pts[0], -pts[1], pts[2]])
    inv = np.linalg.inv(anat.affine)
    flat = ras.reshape(3, -1)
    vox = inv[:3, :3] @ flat + inv[:3, 3:4]
    return vox.reshape(pts.shape)


# --------------------------------------------------------------------------- sites


@dataclass(frozen=True)
class SiteAppearance:
    """One virtual scanner. All values are stored in benchmark.json."""

    name: str
    matrix: int  # rows = columns
    fov_mm: float
    pixel_spacing_mm: float
    gamma: float  # intensity gamma applied to tissue intensity
    bias_amplitude: float  # max relative deviation of the multiplicative bias field
    bias_coefficients: tuple[float, ...]  # quadratic polynomial (x y z x2 y2 z2 xy xz yz)
    noise: str  # "rician" or "gaussian"
    noise_sigma: float  # relative to tissue intensity (white matter ~ 0.84)
    contrast_scale: float  # stored value = scale * intensity + offset
    contrast_offset: float
    bits_stored: int  # 12 or 16
    rescale_slope: float
    rescale_intercept: float
    patient_jitter: float  # std of the per-patient intensity scale and gamma jitter
    manufacturer_model: str


def _site_appearance(seed: int, index: int, *, public: bool = False) -> SiteAppearance:
    """Scanner `index` of the sites, or (``public=True``) of the public set.

    The public scanners draw from their own random streams (keys 7000+ instead
    of 1000+), so no generated site shares a public scanner's appearance, and
    from appearance ranges outside the sites' (`PUBLIC_GAMMA`, more noise, a
    stronger bias field): like a public collection acquired on other scanners
    with other protocols, a model trained on them must still adapt to a site.
    """
    stream = PUBLIC_STREAM if public else 0
    rng = np.random.default_rng([seed, stream + 1000 + index])
    # Cyclic choices over a seed-dependent order guarantee that the first sites differ.
    order = np.random.default_rng([seed, stream + 999]).permutation(len(MATRIX_SIZES))
    pick = int(order[index % len(order)])
    matrix = MATRIX_SIZES[pick]
    slope = SLOPES[int(np.random.default_rng([seed, stream + 998]).permutation(len(SLOPES))[index % len(SLOPES)])]
    fov = FOV_MM[int(rng.integers(len(FOV_MM)))]
    bits = (12, 16)[(index + seed) % 2]
    max_stored = 2**bits - 1
    offset = float(round(rng.uniform(0.0, 150.0), 1))
    if bits == 12:
        scale = float(round(rng.uniform(1500.0, 2600.0), 1))
    else:
        scale = float(round(rng.uniform(3000.0, 30000.0), 1))
    # brightest plausible intensity (bright lesion on biased bright white matter) must fit
    scale = min(scale, (max_stored - offset) / 2.2)
    intercept = float(rng.choice([0.0, 0.0, -100.0, 50.0]))
    return SiteAppearance(
        name=f"public-scanner-{index + 1}" if public else f"site-{index + 1}",
        matrix=matrix,
        fov_mm=fov,
        pixel_spacing_mm=round(fov / matrix, 6),
        gamma=round(float(rng.uniform(*(PUBLIC_GAMMA[index % 2] if public else SITE_GAMMA))), 4),
        bias_amplitude=round(float(rng.uniform(*((0.3, 0.45) if public else (0.0, 0.3)))), 4),
        bias_coefficients=tuple(round(float(c), 4) for c in rng.normal(0.0, 1.0, 9)),
        noise=str(rng.choice(["rician", "gaussian"])),
        noise_sigma=round(float(rng.uniform(*((0.04, 0.06) if public else (0.01, 0.04)))), 4),
        contrast_scale=round(float(scale), 1),
        contrast_offset=offset,
        bits_stored=bits,
        rescale_slope=float(slope),
        rescale_intercept=intercept,
        patient_jitter=round(float(rng.uniform(0.01, 0.04)), 4),
        manufacturer_model=f"medae-synthetic-{'public-' if public else ''}scanner-{index + 1}",
    )


def _bias_field(coefs: np.ndarray, pts: np.ndarray, amplitude: float, center: np.ndarray) -> np.ndarray:
    """1 + amplitude * f with f a quadratic polynomial scaled to max |f| = 1 on the head box."""

    def terms(u: np.ndarray) -> np.ndarray:
        x, y, z = u
        return np.stack([x, y, z, x * x, y * y, z * z, x * y, x * z, y * z])

    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, 7)] * 3, indexing="ij")).reshape(3, -1)
    norm = float(np.abs(np.tensordot(coefs, terms(grid), axes=1)).max()) or 1.0
    u = (pts - center.reshape(3, *([1] * (pts.ndim - 1)))) / 100.0
    f = np.tensordot(coefs, terms(u), axes=1) / norm
    return (1.0 + amplitude * f).astype(np.float32)


# --------------------------------------------------------------------------- patients


@dataclass
class _Deformation:
    center: np.ndarray  # voxel coords
    matrix: np.ndarray  # 3x3 similarity (rotation * scale)
    shift: np.ndarray  # voxels
    field: np.ndarray  # (3, gx, gy, gz) displacement in voxels on a coarse grid
    step: float  # coarse grid spacing in voxels


def _random_deformation(rng: np.random.Generator, shape: tuple[int, ...]) -> _Deformation:
    angles = np.deg2rad(rng.uniform(-3.0, 3.0, 3))
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    scale = rng.uniform(0.95, 1.05) * rng.uniform(0.98, 1.02, 3)
    matrix = rz @ ry @ rx @ np.diag(1.0 / scale)  # inverse map: patient -> template
    step = 4.0
    gshape = tuple(int(math.ceil(s / step)) + 1 for s in shape)
    field = rng.normal(0.0, 1.0, (3, *gshape))
    field = np.stack([ndimage.gaussian_filter(f, 2.0, mode="nearest") for f in field])
    field *= rng.uniform(0.5, 1.0) / max(float(field.std()), 1e-6)  # std 1-2 mm, ~16 mm smooth
    return _Deformation(
        center=(np.array(shape, dtype=np.float64) - 1) / 2,
        matrix=matrix,
        shift=rng.uniform(-1.0, 1.0, 3),
        field=field.astype(np.float32),
        step=step,
    )


def _warp(defo: _Deformation, vox: np.ndarray) -> np.ndarray:
    """Patient voxel coordinates (3, ...) -> template voxel coordinates."""
    flat = vox.reshape(3, -1)
    out = defo.matrix @ (flat - defo.center[:, None]) + defo.center[:, None] + defo.shift[:, None]
    g = flat / defo.step
    for a in range(3):
        out[a] += ndimage.map_coordinates(defo.field[a], g, order=1, mode="nearest")
    return out.reshape(vox.shape)


@dataclass(eq=False)  # identity comparison
class _Lesion:
    kind: str
    center: np.ndarray  # LPS mm
    radii: np.ndarray  # mm
    rotation: np.ndarray  # 3x3
    edge_mm: float
    contrast: float  # bright/dark: relative intensity change; mass: rim level
    wobble: np.ndarray  # (k, 5): direction (3), amplitude, phase
    core_fraction: float = 0.0  # mass: 0 = no dark core
    core_level: float = 0.0
    mass_effect: float = 0.0  # mass: radial displacement strength (0 = none)
    texture: np.ndarray | None = None  # mass: (2, 4) two plane waves: wave vector (3), phase


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    return q


def _new_lesion(kind: str, center: np.ndarray, rng: np.random.Generator) -> _Lesion:
    wobble = np.concatenate(
        [_unit(rng.normal(size=(3, 3))), rng.uniform(0.03, 0.1, (3, 1)), rng.uniform(0, 2 * np.pi, (3, 1))], axis=1
    )
    if kind == "mass":
        r = rng.uniform(12.0, 22.0)
        core = rng.random() < 0.5
        return _Lesion(
            kind=kind,
            center=center,
            radii=r * rng.uniform(0.88, 1.12, 3),
            rotation=_random_rotation(rng),
            edge_mm=rng.uniform(1.2, 2.5),
            contrast=WM_REFERENCE * rng.uniform(1.12, 1.35),
            wobble=wobble,
            core_fraction=rng.uniform(0.4, 0.65) if core else 0.0,
            core_level=WM_REFERENCE * rng.uniform(0.3, 0.55),
            mass_effect=rng.uniform(0.15, 0.3) if rng.random() < 0.5 else 0.0,
            texture=np.concatenate(
                [_unit(rng.normal(size=(2, 3))) * 2 * np.pi / rng.uniform(10, 20, (2, 1)), rng.uniform(0, 6.3, (2, 1))],
                axis=1,
            ),
        )
    r = rng.uniform(7.0, 13.0)
    radii = r * np.array([rng.uniform(1.0, 1.5), rng.uniform(0.8, 1.0), rng.uniform(0.7, 1.0)])
    contrast = rng.uniform(0.2, 0.5) if kind == "bright_wm" else -rng.uniform(0.35, 0.6)
    return _Lesion(
        kind=kind,
        center=center,
        radii=radii,
        rotation=_random_rotation(rng),
        edge_mm=rng.uniform(0.6, 1.4),
        contrast=contrast,
        wobble=wobble,
    )


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _lesion_profile(les: _Lesion, pts: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """Soft indicator in [0, 1] of the (scaled) lesion on one slice's LPS points (3, M, M).

    0.5 on the lesion border. Computed only inside the lesion's bounding box (elsewhere
    the indicator is below 1e-3 and set to 0).
    """
    out = np.zeros(pts.shape[1:], dtype=np.float32)
    r_mean = float(les.radii.mean()) * scale
    wobble = float(np.abs(les.wobble[:, 3]).sum())  # < 0.3 by construction
    reach = (1.0 + 8.0 * les.edge_mm / r_mean) * float(les.radii.max()) * scale / (1.0 - wobble)
    if abs(float(pts[2, 0, 0]) - float(les.center[2])) > reach:
        return out
    cols = np.flatnonzero(np.abs(pts[0, 0, :] - les.center[0]) <= reach)
    rows = np.flatnonzero(np.abs(pts[1, :, 0] - les.center[1]) <= reach)
    if len(cols) == 0 or len(rows) == 0:
        return out
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    sub = pts[:, box[0], box[1]]
    d = sub - les.center.reshape(3, 1, 1)
    local = np.tensordot(les.rotation.T, d, axes=1)
    radii = les.radii.reshape(3, 1, 1) * scale
    r_ell = np.sqrt(np.sum((local / radii) ** 2, axis=0))
    u = local / np.maximum(np.linalg.norm(local, axis=0), 1e-6)
    wob = np.zeros_like(r_ell)
    for w in les.wobble:
        wob += w[3] * np.cos(3.0 * np.tensordot(w[:3], u, axes=1) + w[4])
    dist = (r_ell * (1.0 + wob) - 1.0) * r_mean
    out[box] = expit(-dist / les.edge_mm)
    return out


def _drawn_lesions(
    lesions: list[_Lesion], pts: np.ndarray, wm: np.ndarray, brain: np.ndarray
) -> list[tuple[_Lesion, np.ndarray]]:
    """Lesions that pass the label rule on one slice, with their effective weights."""
    drawn = []
    for les in lesions:
        eff = _effective(les, pts, wm, brain)
        if int((eff >= 0.5).sum()) >= MIN_LESION_PIXELS:
            drawn.append((les, eff))
    return drawn


def _gate(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0)


def _effective(les: _Lesion, pts: np.ndarray, wm: np.ndarray, brain: np.ndarray) -> np.ndarray:
    w = _lesion_profile(les, pts)
    gate = _gate(brain, 0.3, 0.7) if les.kind == "mass" else _gate(wm, 0.2, 0.6)
    return w * gate


@dataclass
class _Slices:
    t1: np.ndarray  # (S, M, M)
    wm: np.ndarray
    brain: np.ndarray
    gm: np.ndarray | None = None  # only when a contrast other than T1 is rendered


def _sample(anat: _Anatomy, defo: _Deformation, pts: np.ndarray, masses: list[_Lesion] = (),
            with_gm: bool = False) -> _Slices:
    """Sample the deformed template at LPS points (3, S, M, M), with optional mass effect (and GM map)."""
    p = pts
    for les in masses:
        d = p - les.center.reshape(3, 1, 1, 1)
        r2 = np.sum(d * d, axis=0)
        reach = 1.6 * float(les.radii.mean())
        # sample closer to the centre => tissue appears pushed outward
        p = les.center.reshape(3, 1, 1, 1) + d * (1.0 - les.mass_effect * np.exp(-r2 / (2 * reach**2)))
    q = _warp(defo, _lps_to_voxel(anat, p))
    flat = q.reshape(3, -1)

    def take(vol: np.ndarray) -> np.ndarray:
        return ndimage.map_coordinates(vol, flat, order=1, mode="constant", cval=0.0).reshape(pts.shape[1:])

    return _Slices(t1=take(anat.t1), wm=take(anat.wm), brain=take(anat.brain),
                   gm=take(anat.gm) if with_gm else None)


@dataclass
class _Patient:
    masks: np.ndarray  # (S, M, M) bool
    kinds: list[list[str]]  # per slice, kinds drawn
    z_mm: np.ndarray
    lesions: list[_Lesion]
    # per contrast, in order: (S, M, M) uint16 stored values and the VOI window (center, width in rescaled units)
    contrasts: dict[str, tuple[np.ndarray, tuple[float, float]]]


def _slice_points(anat: _Anatomy, site: SiteAppearance, z_mm: np.ndarray) -> tuple[np.ndarray, float, float]:
    m, ps = site.matrix, site.pixel_spacing_mm
    x0 = anat.center_lps[0] - site.fov_mm / 2 + ps / 2
    y0 = anat.center_lps[1] - site.fov_mm / 2 + ps / 2
    cols = x0 + ps * np.arange(m)
    rows = y0 + ps * np.arange(m)
    yy, xx = np.meshgrid(rows, cols, indexing="ij")  # image[row, col]
    s = len(z_mm)
    pts = np.empty((3, s, m, m), dtype=np.float64)
    pts[0] = xx
    pts[1] = yy
    pts[2] = z_mm.reshape(s, 1, 1)
    return pts, float(x0), float(y0)


@dataclass
class _LesionPlan:
    """Site-wide lesion bookkeeping shared by the site's test patients."""

    wm_kinds: deque[str]  # white-matter lesion kinds, alternating bright/dark
    slice_counts: np.ndarray  # anomalous test slices so far, per slice index
    with_mass: bool = False  # this patient gets one mass lesion first


def _place_lesions(
    rng: np.random.Generator,
    pts: np.ndarray,
    base: _Slices,
    site: SiteAppearance,
    plan: _LesionPlan,
) -> list[_Lesion]:
    """Add lesions until roughly 30-55 % of the slices are anomalous (>= 2 lesions from 6 slices).

    Lesions are aimed at slice indices that are anomalous in few of the site's
    earlier test patients, so that being anomalous does not go with slice level.
    """
    s = pts.shape[1]
    if s >= 3:
        n_target = round(rng.uniform(0.3, 0.55) * s)
    else:  # one or two slices: keep healthy test slices possible
        n_target = 1 if s == 2 else int(rng.random() < 0.5)
    min_lesions = 0 if n_target == 0 else (2 if s >= 6 else 1)
    anomalous = np.zeros(s, dtype=bool)
    lesions: list[_Lesion] = []
    spacing = float(pts[2, 1, 0, 0] - pts[2, 0, 0, 0]) if s > 1 else 6.0
    for attempt in range(80):
        need_mass = plan.with_mass and n_target > 0 and not lesions and attempt < 40
        if not need_mass and anomalous.sum() >= n_target and len(lesions) >= min_lesions:
            break
        healthy = np.flatnonzero(~anomalous)
        options = healthy if len(healthy) else np.arange(s)
        weights = 1.0 / (1.0 + plan.slice_counts[options]) ** 2
        k = int(rng.choice(options, p=weights / weights.sum()))
        kind = "mass" if need_mass else plan.wm_kinds[0]
        if kind == "mass":
            dist = ndimage.distance_transform_edt(base.brain[k] > 0.5) * site.pixel_spacing_mm
            cand = np.argwhere(dist > 16.0)
        else:
            cand = np.argwhere(base.wm[k] > 0.9)
            if len(cand) == 0:
                cand = np.argwhere(base.wm[k] > 0.75)
        if len(cand) == 0:
            continue
        r, c = cand[int(rng.integers(len(cand)))]
        center = pts[:, k, r, c].copy()
        center[2] += rng.uniform(-0.3, 0.3) * spacing
        les = _new_lesion(kind, center, rng)
        counts = np.array([(_effective(les, pts[:, i], base.wm[i], base.brain[i]) >= 0.5).sum() for i in range(s)])
        if counts[k] < MIN_LESION_PIXELS:
            continue
        if kind != "mass":
            plan.wm_kinds.rotate(-1)
        lesions.append(les)
        anomalous |= counts >= MIN_LESION_PIXELS
    return lesions


def _render_patient(
    anat: _Anatomy,
    site: SiteAppearance,
    rng: np.random.Generator,
    slices_per_patient: int,
    lesion_plan: _LesionPlan | None,
    contrasts: tuple[str, ...] = ("t1",),
) -> _Patient:
    """One patient's slices in every contrast: the same anatomy, lesions and masks, each seen by the scanner."""
    lo, hi = anat.z_mm
    frac = np.linspace(SLICE_RANGE[0], SLICE_RANGE[1], slices_per_patient) if slices_per_patient > 1 else np.array([sum(SLICE_RANGE) / 2])
    z_mm = np.round(lo + (hi - lo) * frac, 3)
    pts, _, _ = _slice_points(anat, site, z_mm)
    defo = _random_deformation(rng, anat.t1.shape)
    with_gm = any(c != "t1" for c in contrasts)
    base = _sample(anat, defo, pts, with_gm=with_gm)
    lesions = _place_lesions(rng, pts, base, site, lesion_plan) if lesion_plan is not None else []

    s = len(z_mm)
    final = _Slices(t1=base.t1.copy(), wm=base.wm.copy(), brain=base.brain.copy(),
                    gm=base.gm.copy() if with_gm else None)
    masses = [les for les in lesions if les.kind == "mass" and les.mass_effect > 0]
    moved_slices: dict[int, list[_Lesion]] = {}
    for i in range(s):
        # Mass effect only on slices where that mass is drawn (label rule: no hidden anomalies).
        active = [
            les for les in masses
            if (_effective(les, pts[:, i], base.wm[i], base.brain[i]) >= 0.5).sum() >= MIN_LESION_PIXELS
        ]
        if active:
            moved = _sample(anat, defo, pts[:, i : i + 1], active, with_gm=with_gm)
            final.t1[i], final.wm[i], final.brain[i] = moved.t1[0], moved.wm[0], moved.brain[0]
            if with_gm:
                final.gm[i] = moved.gm[0]
            moved_slices[i] = active

    masks = np.zeros(final.t1.shape, dtype=bool)
    kinds_per_slice: list[list[str]] = [[] for _ in range(s)]
    drawn_per_slice = []
    for i in range(s):
        drawn = _drawn_lesions(lesions, pts[:, i], final.wm[i], final.brain[i])
        if i in moved_slices and not any(les in moved_slices[i] for les, _ in drawn):
            # the displaced mass fell below the rule after all: undo its mass effect
            final.t1[i], final.wm[i], final.brain[i] = base.t1[i], base.wm[i], base.brain[i]
            if with_gm:
                final.gm[i] = base.gm[i]
            drawn = _drawn_lesions(lesions, pts[:, i], final.wm[i], final.brain[i])
        drawn_per_slice.append(drawn)
        for les, eff in drawn:
            masks[i] |= eff >= 0.5
            if les.kind not in kinds_per_slice[i]:
                kinds_per_slice[i].append(les.kind)

    rendered = {c: _scanner_view(_tissue(c, final, pts, drawn_per_slice), final, pts, anat, site, rng)
                for c in contrasts}
    return _Patient(masks=masks, kinds=kinds_per_slice, z_mm=z_mm, lesions=lesions, contrasts=rendered)


# Tissue intensities of the contrasts other than T1 (the T1 template's own intensities are T1),
# on the template's scale (white matter ~ 0.84 in T1): T2 has bright CSF, FLAIR suppresses it.
CONTRASTS = ("t1", "t2", "flair")
_TISSUE = {"t2": (0.32, 0.52, 0.95), "flair": (0.55, 0.72, 0.10)}  # (WM, GM, CSF)
# How white-matter lesions and masses look: (WM-lesion gain over |T1 contrast|, mass level, core level)
_LESION_LOOK = {"t2": (0.8, 0.78, 0.92), "flair": (0.55, 0.90, 0.22)}


def _tissue(contrast: str, final: _Slices, pts: np.ndarray, drawn_per_slice: list) -> np.ndarray:
    """A contrast's noise-free tissue intensities, lesions drawn in."""
    if contrast == "t1":
        tissue = final.t1.copy()
    else:
        wm_level, gm_level, csf_level = _TISSUE[contrast]
        csf = np.clip(final.brain - final.gm - final.wm, 0.0, 1.0)
        tissue = (wm_level * final.wm + gm_level * final.gm + csf_level * csf).astype(np.float32)
    for i, drawn in enumerate(drawn_per_slice):
        for les, eff in drawn:
            if les.kind == "mass":
                rel = les.contrast / (1.2 * WM_REFERENCE)  # this mass's brightness next to the average mass
                level = np.full(eff.shape, les.contrast if contrast == "t1" else _LESION_LOOK[contrast][1] * rel,
                                dtype=np.float32)
                if les.texture is not None:
                    for wave in les.texture:  # mild internal heterogeneity
                        phase = np.tensordot(wave[:3], pts[:, i], axes=1) + wave[3]
                        level *= 1.0 + 0.025 * np.cos(phase).astype(np.float32)
                if les.core_fraction > 0:
                    core = _lesion_profile(les, pts[:, i], scale=les.core_fraction)
                    core_level = les.core_level if contrast == "t1" else _LESION_LOOK[contrast][2]
                    level = level * (1 - core) + core_level * core
                tissue[i] = tissue[i] * (1 - eff) + level * eff
            elif contrast == "t1":
                tissue[i] = tissue[i] * (1 + les.contrast * eff)
            else:  # white-matter lesions are bright on T2 and FLAIR, whether bright or dark on T1
                tissue[i] = tissue[i] * (1 + (_LESION_LOOK[contrast][0] + abs(les.contrast)) * eff)
    return tissue


def _scanner_view(tissue: np.ndarray, final: _Slices, pts: np.ndarray, anat: _Anatomy, site: SiteAppearance,
                  rng: np.random.Generator) -> tuple[np.ndarray, tuple[float, float]]:
    """Tissue intensities as the site's scanner stores them, and the patient's VOI window."""
    lo, hi = anat.z_mm
    jitter_scale = 1.0 + float(np.clip(rng.normal(0, site.patient_jitter), -0.1, 0.1))
    gamma = site.gamma * (1.0 + float(np.clip(rng.normal(0, site.patient_jitter), -0.1, 0.1)))
    img = np.power(np.clip(tissue * jitter_scale, 0.0, None), gamma)
    coefs = np.asarray(site.bias_coefficients) + rng.normal(0.0, 0.25, 9)
    center = np.array([anat.center_lps[0], anat.center_lps[1], (lo + hi) / 2])
    img = img * _bias_field(coefs, pts, site.bias_amplitude, center)
    sigma = site.noise_sigma
    if site.noise == "rician":
        n1 = rng.normal(0.0, sigma, img.shape)
        n2 = rng.normal(0.0, sigma, img.shape)
        img = np.sqrt((img + n1) ** 2 + n2**2)
    else:
        img = img + rng.normal(0.0, sigma, img.shape)
    max_stored = 2**site.bits_stored - 1
    stored = np.clip(np.rint(img * site.contrast_scale + site.contrast_offset), 0, max_stored).astype(np.uint16)

    # VOI window per patient, like a scanner's auto-window: from just below the background
    # level over 1.5x the background-to-P90-of-brain range (robust to lesions; leaves room
    # for bright lesions). Same window for all slices of the patient.
    values = stored.astype(np.float64) * site.rescale_slope + site.rescale_intercept
    w_lo = float(np.percentile(values, 1.0))
    in_brain = final.brain > 0.5
    w_hi = float(np.percentile(values[in_brain], 90.0)) if in_brain.any() else float(values.max())
    width = max((w_hi - w_lo) * 1.5, 1.0)
    center_w = w_lo - 0.03 * width + width / 2
    return stored, (round(center_w, 1), round(width, 1))


# --------------------------------------------------------------------------- DICOM


def _patient_dataset(
    *,
    site: SiteAppearance,
    site_index: int,
    patient_id: str,
    patient_number: int,
    shape: tuple[int, int],
    window: tuple[float, float],
    uid_key: list[str],
    contrast: str = "t1",
    series_number: int = 1,
):
    """The DICOM tags shared by all slices of one patient's series (one study; one series per contrast)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    ds.SOPClassUID = MR_IMAGE_STORAGE
    date = f"2024{1 + site_index % 12:02d}{1 + patient_number % 28:02d}"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.Modality = "MR"
    ds.Manufacturer = "medae synthetic"
    ds.ManufacturerModelName = site.manufacturer_model
    ds.InstitutionName = f"Synthetic {site.name}"
    ds.StudyDescription = "medae synthetic benchmark (not a real patient)"
    ds.SeriesDescription = f"{contrast.upper()} axial synthetic"
    ds.PatientName = f"Synthetic^{patient_id.replace('-', '')}"
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.PatientIdentityRemoved = "YES"
    ds.BodyPartExamined = "BRAIN"
    ds.ScanningSequence = {"t1": "GR", "t2": "SE", "flair": "IR"}[contrast]
    ds.SequenceVariant = "SP"
    ds.MRAcquisitionType = "3D"
    ds.SliceThickness = "2.0"
    series_key = uid_key if series_number == 1 and contrast == "t1" else [*uid_key, contrast]
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[*uid_key, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[*series_key, "series"])
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[*uid_key, "frame"])  # the contrasts share one frame
    ds.StudyID = f"{patient_number:04d}"
    ds.SeriesNumber = series_number
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = shape
    ds.PixelSpacing = [f"{site.pixel_spacing_mm:.6f}", f"{site.pixel_spacing_mm:.6f}"]
    ds.BitsAllocated = 16
    ds.BitsStored = site.bits_stored
    ds.HighBit = site.bits_stored - 1
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = f"{site.rescale_intercept:g}"
    ds.RescaleSlope = f"{site.rescale_slope:g}"
    ds.RescaleType = "US"
    ds.WindowCenter = f"{window[0]:.1f}"
    ds.WindowWidth = f"{window[1]:.1f}"
    ds.BurnedInAnnotation = "NO"
    return ds


def _write_slice(
    ds,
    path: Path,
    pixels: np.ndarray,
    *,
    slice_index: int,
    origin: tuple[float, float, float],
    uid_key: list[str],
) -> None:
    """Fill in the per-slice tags of a patient's dataset and write one DICOM file."""
    from pydicom.uid import generate_uid

    sop_uid = generate_uid(entropy_srcs=[*uid_key, "sop", str(slice_index)])
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.SOPInstanceUID = sop_uid
    ds.InstanceNumber = slice_index + 1
    ds.ImagePositionPatient = [f"{origin[0]:.4f}", f"{origin[1]:.4f}", f"{origin[2]:.3f}"]
    ds.SliceLocation = f"{origin[2]:.3f}"
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)


def _write_mask(path: Path, mask: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(path, format="PNG")


# --------------------------------------------------------------------------- entry point


def make_benchmark(
    out: Path,
    *,
    sites: int = 3,
    patients: int = 24,
    seed: int = 0,
    slices_per_patient: int = 14,
    test_patients: int | None = None,
    public: int = 0,
    progress: Callable[[int, int], None] | None = None,
    workers: int | None = None,
    contrasts: tuple[str, ...] = ("t1",),
) -> dict[str, Any]:
    """Write the synthetic multi-site DICOM benchmark into ``out`` and return its summary.

    ``out`` must not exist or be an empty folder. Per site, ``patients`` patients are
    made; ``test_patients`` of them (default: a third, at least 2) are test patients
    with lesions, the rest are healthy training patients. ``public > 0`` also writes
    ``out/public/``: that many healthy patients from `PUBLIC_SCANNERS` scanners of
    their own (appearance and anatomy from random streams no site uses), the data
    `medae pretrain` may train on without spending privacy. ``sites`` may be 0 when
    only the public set is wanted. The summary (also written to ``out/benchmark.json``)
    lists per site the patient and slice counts, the anomalous test slices per lesion
    kind and the site's appearance parameters.

    ``workers``: processes to write with (default: every CPU this process may use,
    for 60 patients or more). The files are identical whatever it is.

    ``contrasts``: the sites' contrasts, from `CONTRASTS` (t1, t2, flair). Each patient is
    rendered in each of them from the same anatomy and lesions (a paired multi-contrast set),
    one DICOM series per contrast (``PATIENT/<contrast>/NNN.dcm``, the contrast in
    SeriesDescription, one study and frame of reference); test labels list every contrast's
    file with the slice's one mask. T1 alone (the default) keeps ``PATIENT/NNN.dcm``.
    The public set has the same contrasts.
    """
    contrasts = tuple(contrasts)
    if not contrasts or len(set(contrasts)) != len(contrasts) or set(contrasts) - set(CONTRASTS):
        raise DataError(f"make_benchmark: contrasts must be distinct names from {', '.join(CONTRASTS)}; "
                        f"got {list(contrasts)}")
    out = Path(out)
    checks = (("sites", sites, 0), ("patients", patients, 3), ("seed", seed, 0),
              ("slices_per_patient", slices_per_patient, 1), ("public", public, 0))
    for name, value, low in checks:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise DataError(f"make_benchmark: {name} must be an integer >= {low}; got {value!r}")
    if sites == 0 and public == 0:
        raise DataError("make_benchmark: nothing to write (sites = 0 and public = 0)")
    if slices_per_patient > 40:
        raise DataError(f"make_benchmark: slices_per_patient must be <= 40; got {slices_per_patient}")
    n_test = max(2, round(patients / 3)) if test_patients is None else test_patients
    if isinstance(n_test, bool) or not isinstance(n_test, int) or not 2 <= n_test <= patients - 1:
        raise DataError(f"make_benchmark: test_patients must be an integer from 2 to patients - 1 "
                        f"({patients - 1}); got {n_test!r}")
    if out.exists():
        if not out.is_dir():
            raise DataError(f"cannot write the benchmark to {out}: it exists and is not a folder")
        if any(out.iterdir()):
            raise DataError(
                f"refusing to write the benchmark into {out}: the folder is not empty. "
                f"Choose a new or empty folder (or delete this one first)."
            )
    out.mkdir(parents=True, exist_ok=True)

    n_train = patients - n_test
    total = sites * patients + public
    params = {"sites": sites, "patients": patients, "seed": seed, "slices_per_patient": slices_per_patient}
    if test_patients is not None:
        params["test_patients"] = n_test
    if contrasts != ("t1",):
        params["contrasts"] = ",".join(contrasts)
    summary: dict[str, Any] = {
        "generator": "medae make-benchmark",
        "version": GENERATOR_VERSION,
        "synthetic": True,
        "source": "MNI152 2009 T1 template with WM and brain masks shipped in nilearn (2 mm grid)",
        "parameters": params,
        "lesion_kinds": list(LESION_KINDS),
        "min_lesion_pixels": MIN_LESION_PIXELS,
        "label_rule": LABEL_RULE,
        "sites": [],
    }
    # Independent pieces of work: every patient has its own random stream, so healthy training
    # patients are written in chunks in any order; a site's test patients share its lesion plan
    # and are one piece. The files are the same whatever the number of workers.
    tasks: list[tuple[Callable, tuple, int]] = []
    for si in range(sites):
        for chunk in _chunks(n_train):
            tasks.append((_write_train_patients, (out, seed, si, chunk, slices_per_patient, params, contrasts),
                          len(chunk)))
        tasks.append((_write_test_patients, (out, seed, si, n_train, patients, slices_per_patient, params,
                                             contrasts), n_test))
    for chunk in _chunks(public):
        tasks.append((_write_public_patients, (out / "public", seed, chunk, slices_per_patient, contrasts),
                      len(chunk)))
    results = _run_tasks(tasks, total, progress, workers)

    k = 0
    for si in range(sites):
        site = _site_appearance(seed, si)
        train_slices = 0
        while tasks[k][0] is _write_train_patients:
            train_slices += results[k]
            k += 1
        test = results[k]
        k += 1
        site_sum: dict[str, Any] = {
            "name": site.name,
            "appearance": asdict(site),
            "train": {"patients": n_train, "slices": train_slices},
            "test": test["test"],
            "anomalous_slice_kinds": test["anomalous_slice_kinds"],
        }
        site_sum["appearance"]["bias_coefficients"] = list(site.bias_coefficients)
        summary["sites"].append(site_sum)
        log.debug("benchmark %s: %d train / %d test patients, %d/%d anomalous test slices", site.name, n_train,
                  n_test, test["test"]["anomalous_slices"], test["test"]["slices"])
    if public:
        summary["public"] = _public_summary(seed, public, slices_per_patient)
    (out / "benchmark.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


# Healthy patients per piece of work, and the fewest patients worth starting worker processes for
# (each costs about two seconds to start: imports and the MNI152 template).
_CHUNK = 10
PARALLEL_MIN_PATIENTS = 60


def _chunks(n: int) -> list[list[int]]:
    return [list(range(first, min(first + _CHUNK, n))) for first in range(0, n, _CHUNK)]


def _site_uid_key(params: dict[str, Any], site: SiteAppearance, pid: str) -> list[str]:
    """What a site patient's DICOM UIDs are derived from (never the clock): the same bytes in every run."""
    return ["medae-benchmark", str(GENERATOR_VERSION), *(str(v) for v in params.values()), site.name, pid]


def _run_tasks(tasks: list[tuple[Callable, tuple, int]], total: int,
               progress: Callable[[int, int], None] | None, workers: int | None) -> list[Any]:
    """Each task's result, in order; in spawned worker processes when there is enough work and more than one CPU."""
    from medae_core.data.dataset import usable_cpus

    chosen = workers
    workers = min(usable_cpus() if chosen is None else chosen, len(tasks))
    done = 0
    if progress is not None:
        progress(0, total)
    if workers < 2 or (chosen is None and total < PARALLEL_MIN_PATIENTS):  # here, patient by patient

        def tick() -> None:
            nonlocal done
            done += 1
            if progress is not None:
                progress(done, total)
        return [fn(*args, tick) for fn, args, _ in tasks]
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    results: list[Any] = [None] * len(tasks)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(fn, *args): (i, n) for i, (fn, args, n) in enumerate(tasks)}
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)  # progress as each piece ends
            for future in finished:
                i, n = futures[future]
                if future.exception() is not None:
                    for other in pending:
                        other.cancel()
                    raise future.exception()
                results[i] = future.result()
                done += n
                if progress is not None:
                    progress(done, total)
    return results


def _write_train_patients(out: Path, seed: int, si: int, pis: list[int], slices_per_patient: int,
                          params: dict[str, Any], contrasts: tuple[str, ...] = ("t1",),
                          tick: Callable[[], None] = lambda: None) -> int:
    """Healthy training patients ``pis`` of site ``si``; returns the slices written."""
    anat, site = _anatomy(), _site_appearance(seed, si)
    slices = 0
    for pi in pis:
        pid = f"S{si + 1}-P{pi + 1:03d}"
        pat = _render_patient(anat, site, np.random.default_rng([seed, si, pi, 7]), slices_per_patient, None,
                              contrasts)
        uid_key = _site_uid_key(params, site, pid)
        _write_patient(anat, site, si, pid, pi + 1, pat, out / site.name / "train" / pid, uid_key)
        slices += len(pat.z_mm)
        tick()
    return slices


def _write_test_patients(out: Path, seed: int, si: int, n_train: int, patients: int, slices_per_patient: int,
                         params: dict[str, Any], contrasts: tuple[str, ...] = ("t1",),
                         tick: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """Site ``si``'s test patients, their masks and labels.csv; returns the test part of the site's summary."""
    anat, site = _anatomy(), _site_appearance(seed, si)
    site_dir = out / site.name
    # Every site gets all lesion kinds: test patients alternate with/without a mass,
    # and white-matter lesions alternate bright/dark across the site.
    kinds_rng = np.random.default_rng([seed, 2000 + si])
    mass_parity = int(kinds_rng.integers(2))
    wm_first = ["bright_wm", "dark_wm"] if kinds_rng.random() < 0.5 else ["dark_wm", "bright_wm"]
    lesion_plan = _LesionPlan(wm_kinds=deque(wm_first), slice_counts=np.zeros(slices_per_patient))
    test: dict[str, Any] = {
        "patients": patients - n_train,
        "slices": 0,
        "anomalous_slices": 0,
        "healthy_slices": 0,
        "anomalous_slices_by_kind": {k: 0 for k in LESION_KINDS},
        "lesions_by_kind": {k: 0 for k in LESION_KINDS},
    }
    kinds: dict[str, list[str]] = {}
    rows: list[tuple[str, int, str]] = []
    for pi in range(n_train, patients):
        pid = f"S{si + 1}-P{pi + 1:03d}"
        lesion_plan.with_mass = (pi - n_train) % 2 == mass_parity
        pat = _render_patient(anat, site, np.random.default_rng([seed, si, pi, 7]), slices_per_patient, lesion_plan,
                              contrasts)
        lesion_plan.slice_counts += pat.masks.any(axis=(1, 2))
        uid_key = _site_uid_key(params, site, pid)
        _write_patient(anat, site, si, pid, pi + 1, pat, site_dir / "test" / pid, uid_key)
        for k in range(len(pat.z_mm)):
            rels = [f"{pid}/{_series_folder(contrasts, c)}{k:03d}.dcm" for c in contrasts]
            if pat.masks[k].any():
                (site_dir / "test" / "masks").mkdir(parents=True, exist_ok=True)
                mask_rel = f"masks/{pid}_{k:03d}.png"
                _write_mask(site_dir / "test" / mask_rel, pat.masks[k])
                rows += [(rel, 1, mask_rel) for rel in rels]
                kinds.update({rel: list(pat.kinds[k]) for rel in rels})
                for kd in pat.kinds[k]:
                    test["anomalous_slices_by_kind"][kd] += 1
            else:
                rows += [(rel, 0, "") for rel in rels]
        test["slices"] += len(pat.z_mm)
        for les in pat.lesions:
            test["lesions_by_kind"][les.kind] += 1
        tick()
    with (site_dir / "test" / "labels.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["path", "label", "mask"])
        writer.writerows(rows)
    test["anomalous_slices"] = sum(r[1] for r in rows) // len(contrasts)  # slice positions, in each contrast
    test["healthy_slices"] = len(rows) // len(contrasts) - test["anomalous_slices"]
    return {"test": test, "anomalous_slice_kinds": kinds}


def _series_folder(contrasts: tuple[str, ...], contrast: str) -> str:
    """Where a contrast's series goes in the patient's folder: the folder itself for T1 alone."""
    return "" if contrasts == ("t1",) else f"{contrast}/"


def _write_patient(anat, site: SiteAppearance, site_index: int, pid: str, number: int, pat: _Patient,
                   pdir: Path, uid_key: list[str]) -> None:
    """One patient's slices, one DICOM series per contrast, in ``pdir``."""
    contrasts = tuple(pat.contrasts)
    _, x0, y0 = _slice_points(anat, site, pat.z_mm[:1])
    for number_in_study, (contrast, (stored, window)) in enumerate(pat.contrasts.items(), 1):
        sdir = pdir / _series_folder(contrasts, contrast)
        sdir.mkdir(parents=True, exist_ok=True)
        ds = _patient_dataset(site=site, site_index=site_index, patient_id=pid, patient_number=number,
                              shape=stored.shape[1:], window=window, uid_key=uid_key, contrast=contrast,
                              series_number=number_in_study)
        sop_key = uid_key if contrasts == ("t1",) else [*uid_key, contrast]
        for k in range(len(pat.z_mm)):
            _write_slice(ds, sdir / f"{k:03d}.dcm", stored[k], slice_index=k,
                         origin=(x0, y0, float(pat.z_mm[k])), uid_key=sop_key)


def _write_public_patients(out: Path, seed: int, js: list[int], slices_per_patient: int,
                           contrasts: tuple[str, ...] = ("t1",), tick: Callable[[], None] = lambda: None) -> int:
    """Healthy public patients ``js`` over `PUBLIC_SCANNERS` public scanners, in ``out`` (one folder per patient)."""
    anat = _anatomy()
    scanners = [_site_appearance(seed, j, public=True) for j in range(PUBLIC_SCANNERS)]
    for j in js:
        scanner = scanners[j % len(scanners)]
        pid = f"PUB-P{j + 1:04d}"
        rng = np.random.default_rng([seed, PUBLIC_STREAM, j, 7])
        pat = _render_patient(anat, scanner, rng, slices_per_patient, None, contrasts)
        uid_key = ["medae-benchmark-public", str(GENERATOR_VERSION), str(seed), str(slices_per_patient), pid]
        _write_patient(anat, scanner, 100 + j % len(scanners), pid, j + 1, pat, out / pid, uid_key)
        tick()
    return len(js)


def _public_summary(seed: int, n: int, slices_per_patient: int) -> dict[str, Any]:
    scanners = [_site_appearance(seed, j, public=True) for j in range(PUBLIC_SCANNERS)]
    return {
        "patients": n,
        "slices": n * slices_per_patient,
        "healthy": True,
        "description": f"medae built-in public set: {n} healthy synthetic patients (MNI152 anatomy, "
                       f"{len(scanners)} scanners no site uses), seed {seed}",
        "scanners": [asdict(s) | {"bias_coefficients": list(s.bias_coefficients)} for s in scanners],
    }
