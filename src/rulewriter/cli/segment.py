"""`rulewriter segment`: masks from a segmenter spec (studies/segment.py, the sources in studies/segmenters.py)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import RulewriterError
from ..studies.segment import SPEC_FORMS, load_segmenter
from .common import add_command, add_json_arg


# ------------------------------------------------------------------------------------------ CLI
def _mask_png(mask: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(mask * 255.0), 0, 255).astype(np.uint8), mode="L")


def cmd_segment(args: argparse.Namespace) -> None:
    """``rulewriter segment``: one mask PNG (and optionally an overlay) per image."""
    from ..concepts.heatmap import overlay
    from ..models.data import load_image
    from ..studies.report import save_png

    paths = [Path(p) for p in args.images]
    stems: dict[str, Path] = {}
    for p in paths:
        if p.stem in stems and stems[p.stem] != p:
            raise RulewriterError(f"{stems[p.stem]} and {p} would both write {p.stem}.mask.png; "
                                  "segment them into separate --out-dir folders")
        stems[p.stem] = p
    classifier = args.model
    seg = load_segmenter(args.segmenter, classifier=classifier, weights=args.weights, stats=args.stats,
                         threshold=args.threshold, quantile=args.quantile, calibration=args.calibration,
                         device=args.device, size=args.size)
    images = [load_image(p) for p in paths]  # every bad file fails here, before any work or output
    results = []
    for p, img in zip(paths, images):  # all masks before any write: a failure leaves nothing half-done
        m = seg(img, source=p)
        results.append((p, img, m))
    out_dir = Path(args.out_dir)
    rows = []
    for p, img, m in results:
        dest = save_png(out_dir / f"{p.stem}.mask.png", _mask_png(m))
        row: dict[str, Any] = {"file": str(p), "mask": str(dest), "area": round(float(m.mean()), 6)}
        if args.overlay:
            row["overlay"] = str(save_png(out_dir / f"{p.stem}.overlay.png",
                                          overlay(img, m, alpha=0.5, normalize="none")))
        rows.append(row)
    if args.json:
        print(json.dumps({"segmenter": seg.name, "images": rows}, indent=2))
    else:
        print("\n".join(f"{r['mask']}  area={r['area']:.4f}" for r in rows))


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``rulewriter segment`` to the command's subparsers."""
    p = add_command(
        sub, "segment", "write concept masks for images (COCO, mask files, context match, DeepLab, torchvision)",
        description="Write one mask PNG per image (white = concept), <stem>.mask.png, into --out-dir.\n\n"
                    + SPEC_FORMS,
        example="rulewriter segment --segmenter deeplab:car --overlay --out-dir masks/ car1.jpg car2.jpg")
    p.add_argument("--segmenter", required=True, help="segmenter spec (forms above)")
    p.add_argument("--out-dir", default="rulewriter-masks", help="output folder")
    p.add_argument("--overlay", action="store_true", help="also write <stem>.overlay.png")
    p.add_argument("--model", default=None, help="context: the classifier (default: the concept's model)")
    p.add_argument("--weights", default=None, help="context: the classifier's weights file")
    p.add_argument("--stats", default=None, help="context: the layer's statistics file (C)")
    p.add_argument("--threshold", type=float, default=None, help="context: explicit heat threshold")
    p.add_argument("--quantile", type=float, default=None, help="context: quantile of the calibration heat (0.99)")
    p.add_argument("--calibration", default=None, help="context: image folder to take the quantile over")
    p.add_argument("--size", type=int, default=None, help="torchvision: short side of the input (default 520)")
    p.add_argument("--device", default="cpu", help="torch device for model-based segmenters: cpu, cuda, cuda:1")
    add_json_arg(p, "per-image file, mask and area fraction")
    p.add_argument("images", nargs="+", help="the photos to segment")
    p.set_defaults(func=cmd_segment)
