"""Rebuild the public models that ship with medae (medae_core/pretrained/<kind>-<size>/).

    python scripts/build_pretrained.py [--kinds ae,vae,dae,sae] [--image-size 64]

Each one: the built-in public set (`medae make-benchmark --sites 0 --public 200
--seed 0`: 200 healthy synthetic patients from 4 scanners no benchmark site
uses), then `medae pretrain` with the pinned settings in
`medae_core.pretrain.BUILTIN_TRAIN` (30 epochs, no DP: the data are public).
The same code builds, on first use, a model for a configuration none ships for.
About 2 minutes per model on 2 CPU cores.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medae_core.config import RunConfig  # noqa: E402
from medae_core.pretrain import build_builtin  # noqa: E402
from medae_core.starts import SHIPPED_DIR  # noqa: E402

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kinds", default="ae,vae,dae,sae")
    ap.add_argument("--image-size", type=int, default=64)
    args = ap.parse_args()
    for kind in args.kinds.split(","):
        cfg = RunConfig().with_overrides({"model.kind": kind, "model.image_size": args.image_size})
        out = SHIPPED_DIR / f"{kind}-{args.image_size}"
        summary = build_builtin(cfg, out)
        print(f"{out}: {summary['data']}; loss {summary['loss']:.5f}, val loss {summary['val_loss']:.5f}")
