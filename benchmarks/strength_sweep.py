"""Strength sweep: GR, LR and top-1 changes on C's own photos versus other photos, per strength.

For rule variants (the mean key, with and without augmented views; SVD rank 4 with views; SVD and ZCA rank 1)
of the scoreboard's scenarios (``generalise.py``'s exemplars and held-out photos), every strength of
{1, 1.5, 2, 3, 4, 6, 8, 12, 16}: SR, GR, LR and Δ top-1 on the 500 odd-indexed imagenet-samples photos,
and ``cal``: the share of the 500 *even-indexed* photos (the ones C was collected from) whose top-1 is
unchanged. It is the measurement behind two choices of ``rulewriter.core.generalise``: the output-energy
budget (``coll``) does not bind before top-1 changes start, and C's own photos understate the changes (so
calibration images must be other photos). Exploration, not a scoreboard: it prints held-out figures for
every strength, and no default was read off them.

Run: ``python benchmarks/strength_sweep.py "wood wheels,gravel car,brick car"``; writes
``benchmarks/results/strength_sweep.json``.
"""
import sys, json, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch, numpy as np
import _common as C
import generalise as G
from rulewriter.models.registry import load_classifier
from rulewriter.core.stats import collect_second_moment
from rulewriter.core.tail import tail_start, run_tail
from rulewriter.core.rules import rewrite, rule_from_images
from rulewriter.models.data import load_image
from accuracy_cost import load_textures

C.setup_torch(2)
shared = C.shared_dir()
clf = load_classifier("efficientnet-lite0"); layer = clf.default_layer; start = tail_start(clf.model, layer)
paths, labels = C.imagenet_samples(shared, clf)
stats = collect_second_moment(clf, layer, paths[0:1000:2], cache_dir=C.CACHE_DIR, progress=False)
def photoset(ps):
    ph = G.cached_tensors(G._key("photos", [p.name for p in ps], clf.weights_id), lambda: dict(zip(
        ("x", "logits"), G.tail_inputs(clf, layer, [load_image(p) for p in ps]))))
    prob = ph["logits"].softmax(1).topk(2, 1).values
    return ph["x"], ph["logits"].argmax(1), (prob[:, 0] - prob[:, 1]) <= 0.05
ox, ob, osens = photoset(paths[1:1000:2]); ex_, eb, esens = photoset(paths[0:1000:2])
olab = torch.as_tensor(labels[1:1000:2])
print("odd sens", int(osens.sum()), "even sens", int(esens.sum()), flush=True)
textures = load_textures(shared)
names = sys.argv[1].split(",")
spec = {"wood wheels": ("wheels", "wood"), "snow ground": ("ground", "snow"), "gravel car": ("car", "gravel"),
        "brick car": ("car", "brick"), "grass car": ("car", "grass"), "snow car": ("car", "snow")}
mfn = {"wheels": G.wheel_masks, "car": lambda i, p: C.whole_car_mask(i, p), "ground": G.ground_mask}
S = [1, 1.5, 2, 3, 4, 6, 8, 12, 16]
out = []
for name in names:
    kind, tex = spec[name]
    test = G.car_set(shared, "testset", mfn[kind], None) + (G.ade_set(shared) if kind == "ground" else [])
    train = G.car_set(shared, "trainingset", mfn[kind], G.TRAIN_SCAN)
    t = G.cached_tensors(G._key("clean", [p.name for p in test], clf.weights_id),
                         lambda: {"top1": G.tail_inputs(clf, layer, [p.image for p in test])[1].argmax(1)})
    clean = {p.name: v for p, v in zip(test, t["top1"])}
    sc = G.build_scenario(clf, layer, name, tex, textures[tex], train, test, clean)
    for n in (5, 1):
        o, m, k = sc.ex_orig[:n], sc.ex_man[:n], sc.ex_mask[:n]
        r0 = rule_from_images(clf, layer, o, m, k, views=0)
        r4 = rule_from_images(clf, layer, o, m, k, views=4)
        variants = {"mean": (r0, dict(context="mean")), "mean+aug": (r4, dict(context="mean")),
                    "svd4+aug": (r4, dict(context="svd", rank=4)), "svd1": (r0, dict(context="svd", rank=1)),
                    "zca1": (r0, dict(context="zca", rank=1))}
        for vname, (rule, kw) in variants.items():
            try:
                e = rewrite(clf, rule, stats, strength=1.0, **kw)
            except Exception as err:
                print(name, n, vname, "failed", err); continue
            for s in S:
                with e.scaled(s).applied(clf.model):
                    ex = G.tail_top1(clf, start, sc.ex_x[:n]); ho = G.tail_top1(clf, start, sc.ho_x)
                    po = G.tail_top1(clf, start, ox); pe = G.tail_top1(clf, start, ex_)
                row = dict(sc=name, n=n, v=vname, s=s, SR=float((ex == sc.ex_target[:n]).float().mean()),
                           GR=float((ho == sc.ho_target).float().mean()),
                           LR=float((po == ob).float().mean()), LRs=float((po == ob)[osens].float().mean()),
                           d=C.top1_accuracy(po, olab) - C.top1_accuracy(ob, olab),
                           cal=float((pe == eb).float().mean()), cals=float((pe == eb)[esens].float().mean()),
                           coll=e.meta["strength"]["collateral"] * s * s)
                out.append(row)
                print(f"{name:12s} n={n} {vname:9s} s={s:<4} SR {row['SR']:.2f} GR {row['GR']:.2f} LR {row['LR']:.3f}/{row['LRs']:.2f} "
                      f"d {row['d']:+.1f} | cal {row['cal']:.3f}/{row['cals']:.2f} coll {row['coll']:.3f}", flush=True)
    (C.RESULTS_DIR / "strength_sweep.json").write_text(json.dumps({"scenarios": names, "rows": out}, indent=1))
