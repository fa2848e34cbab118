"""Figures are valid PNGs and never touch pyplot's global state."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from medae_core.figures import image_grid, line_figure, roc_pr_figure, save_overlay, to_data_uri

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _open(png: bytes) -> Image.Image:
    assert png[:8] == PNG_SIGNATURE and len(png) > 1000
    im = Image.open(io.BytesIO(png))
    im.load()
    return im


def _pair(s=32):
    yy, xx = np.mgrid[:s, :s]
    img = ((yy - 16) ** 2 + (xx - 16) ** 2 < 144).astype(np.float32) * 0.5
    amap = np.exp(-((yy - 12) ** 2 + (xx - 18) ** 2) / 8.0).astype(np.float32)
    return img, amap


def test_save_overlay_writes_a_small_png_with_contours(tmp_path):
    img, amap = _pair()
    out = save_overlay(tmp_path / "sub" / "o.png", img, amap, threshold=0.5, title="case 1", gt_mask=amap > 0.3)
    im = _open(out.read_bytes())
    assert im.format == "PNG"
    assert 150 < im.size[0] <= 400 and 150 < im.size[1] <= 400  # ~3.6 x 3.2 in at 100 dpi
    # degenerate inputs (flat map, threshold outside range, empty mask) still work
    save_overlay(tmp_path / "flat.png", img, np.zeros_like(img), threshold=2.0, gt_mask=np.zeros_like(img))
    assert (tmp_path / "flat.png").read_bytes()[:8] == PNG_SIGNATURE


def test_roc_pr_figure_is_a_png_and_tolerates_single_class_curves():
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(20), np.ones(20)]
    png = roc_pr_figure({
        "model": (rng.random(40) + y, y),
        "intensity baseline": (rng.random(40), y),
        "only healthy": (rng.random(5), np.zeros(5)),
    }, title="test")
    im = _open(png)
    assert im.size[0] > im.size[1]  # side by side
    assert to_data_uri(png).startswith("data:image/png;base64,iVBOR")


def test_line_figure_and_image_grid_are_pngs():
    _open(line_figure({"fedavg": [(1, 0.5), (2, 0.7), (3, None)], "empty": []}, "round", "AUROC", "AUROC per round"))
    _open(line_figure({"loss": [(1, 1.0), (2, 0.1)]}, "round", "loss", logy=True))
    img, amap = _pair()
    png = image_grid(
        [("input", [img, img * 0.9]), ("reconstruction", [img * 0.8, img]), ("map", [amap], "inferno"),
         ("flat", [np.zeros_like(img)])],
        titles=["a", "b"],
    )
    im = _open(png)
    assert im.size[1] > im.size[0]  # 4 rows x 2 columns


def test_image_grid_grayscale_rows_share_one_intensity_range():
    img, _ = _pair()
    png = image_grid([("input", [img]), ("reconstruction", [img * 0.5])])
    g = np.asarray(_open(png).convert("L"), dtype=float)
    top, bottom = g[: g.shape[0] // 2], g[g.shape[0] // 2 :]
    # the half-intensity reconstruction must look mid-gray, not be rescaled to white
    def mid_gray(a):
        return int(((a > 100) & (a < 160)).sum())

    assert mid_gray(bottom) > 1000 and mid_gray(top) < 100


def test_figures_module_does_not_import_pyplot():
    code = "import sys, medae_core.figures; print('matplotlib.pyplot' in sys.modules)"
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip() == "False"
