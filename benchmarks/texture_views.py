"""Several patches of the new concept: exemplar views whose texture is pasted afresh, not cropped along.

The issue's one idea not yet measured: "several textures or styles of the new concept". The default's views
crop the manipulated exemplar together with its original, so every view shows the same patch of the texture
at the place it was pasted. Here each augmented view's manipulated image is instead the texture pasted
afresh (``paste_texture``, shading kept) into the view's own crop of the original and mask, from another
patch of the same texture: a random crop of 40–100 % of its area (aspect 3/4–4/3), flipped and turned by a
multiple of 90° at random. Principle under test: a rule about gravel should hold for gravel, not for one
patch of it. Everything else is the default at block 15 (validation, budget, spending); the same run's
default beside it.

Exploration, not a method: it prints held-out figures and no default is read off it.

Run: ``python benchmarks/texture_views.py [--scenarios ...]``; writes ``benchmarks/results/texture_views.{json,md}``.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parent))
import generalise as G  # noqa: E402


def texture_patch(texture: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Another patch of ``texture``: a random crop (40–100 % of the area), flip and quarter turn."""
    w, h = texture.size
    area = w * h * rng.uniform(0.4, 1.0)
    ratio = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
    cw, ch = min(w, int(round((area * ratio) ** 0.5))), min(h, int(round((area / ratio) ** 0.5)))
    left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    patch = texture.convert("RGB").crop((left, top, left + cw, top + ch))
    if rng.random() < 0.5:
        patch = ImageOps.mirror(patch)
    return patch.rotate(90 * int(rng.integers(0, 4)), expand=True)


def probe(rows: list[dict[str, Any]]):
    def run(clf: Any, layer: str, start: str, sc: Any, n: int, stats: Any, cal: Any, photos: Any) -> None:
        import rulewriter.core.generalise as gen
        from rulewriter.concepts.manipulate import paste_texture
        from rulewriter.core.rules import rewrite, rule_from_images

        plain = gen.augment_exemplar

        def repasted(original, manipulated, mask, rng, size=gen.VIEW_SIZE):
            o, _, mk = plain(original, manipulated, mask, rng, size)
            return o, paste_texture(o, mk, texture_patch(sc.texture_image, rng)), mk

        o, m, k = sc.ex_orig[:n], sc.ex_man[:n], sc.ex_mask[:n]
        for label, aug in (("default", plain), ("texture pasted afresh", repasted)):
            gen.augment_exemplar = aug
            try:
                t0 = time.perf_counter()
                e = rewrite(clf, rule_from_images(clf, layer, o, m, k, views=gen.DEFAULT_VIEWS), stats,
                            calibration=cal)
                secs = time.perf_counter() - t0
            finally:
                gen.augment_exemplar = plain
            st = e.meta["strength"]
            rows.append(G.probe_row(clf, start, sc, n, photos, cal, e, label, views=label, seconds=secs,
                                    candidate=st.get("candidate"), strength=st["chosen"]))
    return run


def main(argv: list[str] | None = None) -> int:
    rows: list[dict[str, Any]] = []
    G.run_probe(argv, probe(rows), scenarios=",".join(G.SCENARIOS), exemplars="5,1")
    md = ("# Exemplar views with the texture pasted afresh\n\nThe default at block 15; its views crop the "
          "pasted exemplar (default) or paste another patch of the texture into each view "
          "(texture pasted afresh). SR, GR, LR and Δ top-1 on the scoreboard's sets.\n\n"
          + G.probe_table(rows, [("views", lambda r: r["views"]), ("candidate", lambda r: r["candidate"]),
                                 ("strength", lambda r: r["strength"])])
          + "\n\n" + G.means_table(rows, "views"))
    return G.report_probe("texture_views", {"rows": rows}, md)


if __name__ == "__main__":
    raise SystemExit(main())
