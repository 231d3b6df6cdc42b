"""Bad input on the command line and in files: one ``rulewriter: error:`` line, exit status 2, no traceback and
nothing written (issue 12). Every case found by fuzzing the CLI and the files is a row of ``CASES``.

A tiny deterministic classifier stands in for EfficientNet-Lite0 (``load_classifier`` is patched), so the
whole file runs in seconds; the few cases about the real model's files only read their paths.
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from rulewriter.cli import main
from rulewriter.models import registry

LAYER = "features.2"


from fixture_models import Tiny  # noqa: E402


def tiny_classifier(name: str | None = None, weights=None):
    from rulewriter.models.preprocess import Preprocess

    torch.manual_seed(0)
    clf = registry.load_classifier(Tiny(), labels=["cat", "dog", "car", "van"], weights=weights,
                                   preprocess=Preprocess(size=32, resize=32, mean=(0.5,) * 3, std=(0.5,) * 3))
    if name:
        clf.name = name
    return clf


def _image(path: Path, seed: int, size=(48, 40)) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def _save_raw(path: Path, tensors: dict, header: dict) -> Path:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=header)
    return path


@pytest.fixture()
def work(tmp_path, monkeypatch, one_thread):
    """A folder with images, a mask, statistics, an edit and a weights file made with the tiny model, the
    cache inside it, and ``load_classifier`` returning the tiny model for any name."""
    from rulewriter.core.rules import rewrite, rule_from_images
    from rulewriter.core.stats import collect_second_moment

    real = registry.load_classifier
    monkeypatch.setattr(registry, "load_classifier",
                        lambda model, *a, **kw: real(model, *a, **kw) if isinstance(model, nn.Module)
                        else tiny_classifier(weights=kw.get("weights")))
    monkeypatch.chdir(tmp_path)
    w = tmp_path
    for i, name in enumerate(["a.png", "b.png", "man.png"]):
        _image(w / name, i)
    m = np.zeros((40, 48), np.uint8)
    m[8:30, 10:36] = 255
    Image.fromarray(m).save(w / "m.png")
    (w / "photos").mkdir()
    for i in range(6):
        _image(w / "photos" / f"p{i}.png", 10 + i)
    for label in ("cat", "dog"):
        (w / "data" / label).mkdir(parents=True)
        for i in range(2):
            _image(w / "data" / label / f"{i}.png", 20 + i + 3 * len(label))
    clf = tiny_classifier()
    stats = collect_second_moment(clf, LAYER, w / "photos", progress=False)
    stats.save(w / "C.safetensors")
    edit = rewrite(clf, rule_from_images(clf, LAYER, [w / "a.png"], [w / "man.png"], [w / "m.png"]), stats)
    edit.save(w / "E.safetensors")
    torch.save(clf.model.state_dict(), w / "W.pth")
    (w / "cache").mkdir()
    return w


def _run(capsys, argv) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # usage errors leave through argparse
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def _listing(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.is_dir(), p.stat().st_size if p.is_file() else 0,
                                       p.stat().st_mtime_ns if p.is_file() else 0)
            for p in sorted(root.rglob("*"))}


def package_weights() -> Path:
    return Path(registry.weights_available("efficientnet-lite0"))


# ------------------------------------------------------------------------------------------ file makers
def stats_with(w: Path, *, meta=None, count=None, model=None) -> Path:
    """C.safetensors rewritten with a broken ``meta`` header, a ``count`` tensor, or another model's name."""
    from rulewriter.core.stats import FORMAT, SecondMoment

    s = SecondMoment.load(w / "C.safetensors")
    if model is not None:
        s.meta["model"] = model
        return s.save(w / "C2.safetensors")
    state = s.state_dict()
    if count is not None:
        state["count"] = count
    header = {"format": FORMAT, "precision": "fp64", "meta": json.dumps(s.meta) if meta is None else meta}
    return _save_raw(w / "C2.safetensors", state, header)


def edit_with(w: Path, *, scalar=False, deep=False, scale=None, delta_max=None, model=None, layer=None,
              meta=None) -> Path:
    """E.safetensors with scalar tensors, a description nested 100,000 deep, factors scaled by ``scale`` (or
    so that the largest entry of ΔW is ``delta_max``), or a description that names another model (and layer)."""
    from rulewriter.core.edit import FORMAT, Edit, LayerUpdate

    e = Edit.load(w / "E.safetensors")
    out = w / "E2.safetensors"
    if scalar:
        desc = e.describe()
        return _save_raw(out, {"updates.0.lam": torch.tensor(1.0), "updates.0.direction": torch.tensor(2.0)},
                         {"format": FORMAT, "rulewriter": json.dumps(desc)})
    if meta is not None:
        desc = {**e.describe(), "meta": meta}
        return _save_raw(out, {"updates.0.lam": e.updates[0].lam, "updates.0.direction": e.updates[0].direction},
                         {"format": FORMAT, "rulewriter": json.dumps(desc)})
    if deep:
        return _save_raw(out, {"updates.0.lam": e.updates[0].lam},
                         {"format": FORMAT, "rulewriter": "[" * 100_000 + "]" * 100_000})
    u = e.updates[0]
    if delta_max is not None:  # a dense rank-one ΔW: every output channel gets huge, and their sums overflow
        g = torch.Generator().manual_seed(1)
        u = LayerUpdate(u.layer, u.view, torch.randn(u.lam.shape, generator=g, dtype=torch.float64),
                        torch.randn(u.direction.shape, generator=g, dtype=torch.float64))
        scale = (delta_max / float(u.delta().abs().max())) ** 0.5
    if scale is not None:
        u = LayerUpdate(u.layer, u.view, u.lam * scale, u.direction * scale)
    if layer is not None:
        u = LayerUpdate(layer, u.view, u.lam, u.direction)
    meta = dict(e.meta)
    if model is not None:
        meta["model"] = model
    Edit([u], meta).save(out, sidecar=False)
    return out


def inverse_stats(w: Path, model: str) -> Path:
    """Statistics of the layer's outputs (view 3, for inverse-edit) whose metadata names ``model``."""
    from rulewriter.core.stats import collect_second_moment

    s = collect_second_moment(tiny_classifier(), LAYER, w / "photos", view=3, progress=False)
    s.meta["model"] = model
    return s.save(w / "C3.safetensors")


def spectrum_of(w: Path, model: str) -> Path:
    """A key spectrum of the layer (for inverse-edit --solver fourier) whose metadata names ``model``."""
    from rulewriter.extensions.fourier import collect_key_spectrum

    spec = collect_key_spectrum(tiny_classifier(), LAYER, w / "photos", progress=False)
    spec.meta["model"] = model
    return spec.save(w / "S.safetensors")


def shard_part(w: Path) -> Path:
    from rulewriter.core.stats import collect_second_moment

    s = collect_second_moment(tiny_classifier(), LAYER, w / "photos", shard="0/2", progress=False)
    return s.save(w / "part0.safetensors")


EDIT = ["edit", "--layer", LAYER, "--original", "a.png", "--manipulated", "man.png", "--mask", "m.png", "--no-cache",
        "--quiet"]
STATS = ["stats", "--layer", LAYER, "--data", "photos", "--no-cache", "--quiet"]
HEAT = ["heatmap", "--layer", LAYER, "--concept-image", "a.png", "--concept-mask", "m.png", "--no-cache", "--quiet"]
ADD = ["add-class", "--layer", LAYER, "--image", "a.png", "--mask", "m.png", "--negatives", "photos", "--name", "x"]
CUDA = torch.cuda.is_available()

#: (case, how to make its files → argv, what the message must say)
CASES = {
    # --out that would overwrite an input or model weights
    "edit --out is its own --weights": (lambda w: EDIT + ["--stats", "C.safetensors", "--weights", "W.pth",
                                                          "--out", "W.pth"], r"weights|input"),
    "stats --out is the package's weights": (lambda w: STATS + ["--out", package_weights()], r"weights file"),
    "edit --out is its own --stats": (lambda w: EDIT + ["--stats", "C.safetensors", "--out", "C.safetensors"],
                                      r"also an input"),
    "edit --out is a symlink to --stats": (
        lambda w: (os.symlink(w / "C.safetensors", w / "link.safetensors"),
                   EDIT + ["--stats", "C.safetensors", "--out", "link.safetensors"])[1], r"also an input"),
    "stats --out is a torch checkpoint": (lambda w: STATS + ["--out", "W.pth"], r"weights file"),
    # --out that cannot be written
    "edit --out an existing folder": (lambda w: EDIT + ["--stats", "C.safetensors", "--out", "photos"], r"folder"),
    "stats --out an existing folder": (lambda w: STATS + ["--out", "photos"], r"folder"),
    "merge-stats --out an existing folder": (lambda w: ["merge-stats", "--out", "photos", "C.safetensors"],
                                             r"folder"),
    "add-class --out an existing folder": (lambda w: ADD + ["--out", "photos"], r"folder"),
    "edit --out out/": (lambda w: EDIT + ["--stats", "C.safetensors", "--out", "out/"], r"folder"),
    "stats --out out/": (lambda w: STATS + ["--out", "out/"], r"folder"),
    "edit --out /proc/x.safetensors": (lambda w: EDIT + ["--stats", "C.safetensors", "--out", "/proc/x.safetensors"],
                                       r"cannot write"),
    "stats --out in a missing folder": (lambda w: STATS + ["--out", "nowhere/C.safetensors"], r"does not exist"),
    "edit: the sidecar .json is a folder": (
        lambda w: ((w / "new.safetensors.json").mkdir(), EDIT + ["--stats", "C.safetensors", "--out",
                                                                  "new.safetensors"])[1], r"description.*folder"),
    "heatmap --out-dir is a file": (lambda w: HEAT + ["--out-dir", "a.png", "b.png"], r"not a folder"),
    "evaluate --out is a file": (lambda w: ["evaluate", "--data", "data", "--out", "a.png"], r"not a folder"),
    "evaluate --out inside its --data": (lambda w: ["evaluate", "--data", "data", "--out", "data/report"],
                                         r"inside data"),
    "heatmap --out-dir is its --stats-data": (lambda w: HEAT + ["--stats-data", "photos", "--out-dir", "photos",
                                                                "b.png"], r"inside photos"),
    # --weights in the user's words, not torch's (which suggests weights_only=False)
    "--weights a whole pickled model": (lambda w: (torch.save(Tiny(), w / "model.pth"),
                                                   ["predict", "--weights", "model.pth", "a.png"])[1],
                                        r"never unpickles(?!.*weights_only)"),
    "--weights an image": (lambda w: ["predict", "--weights", "b.png", "a.png"],
                           r"not a safetensors file or a torch state dict(?!.*weights_only)"),
    # counts, devices and usage
    "a usage error (edit --view 9)": (lambda w: ["edit", "--view", "9", "--out", "x.safetensors"], r"invalid choice"),
    "add-class --n-negatives -1": (lambda w: ADD + ["--n-negatives", "-1", "--out", "x.safetensors"],
                                   r"--n-negatives must be 0 or more"),
    "edit --stats-samples -5": (lambda w: EDIT + ["--stats-data", "photos", "--stats-samples", "-5", "--out",
                                                  "x.safetensors"], r"--stats-samples must be at least 1"),
    "stats --workers -1": (lambda w: STATS + ["--workers", "-1"], r"--workers must be 0 or more"),
    "predict --topk 0": (lambda w: ["predict", "--topk", "0", "a.png"], r"--topk must be at least 1"),
    "predict --device foo": (lambda w: ["predict", "--device", "foo", "a.png"], r"not a torch device"),
    "predict --device cuda without a GPU": (lambda w: ["predict", "--device", "cuda", "a.png"], r"no CUDA GPU"),
    "stats --device cuda:0 without a GPU": (lambda w: STATS + ["--device", "cuda:0"], r"CUDA"),
    # statistics files
    "stats meta is not JSON": (lambda w: EDIT + ["--stats", stats_with(w, meta="{broken"), "--out", "x.safetensors"],
                               r"metadata is not valid JSON"),
    "stats meta is not an object": (lambda w: EDIT + ["--stats", stats_with(w, meta="[1, 2]"), "--out",
                                                      "x.safetensors"], r"JSON object"),
    "stats count is empty": (lambda w: EDIT + ["--stats", stats_with(w, count=torch.zeros(0, dtype=torch.int64)),
                                               "--out", "x.safetensors"], r"no keys"),
    "stats count is zero": (lambda w: EDIT + ["--stats", stats_with(w, count=torch.zeros(1, dtype=torch.int64)),
                                              "--out", "x.safetensors"], r"no keys"),
    "stats of another model": (lambda w: EDIT + ["--stats", stats_with(w, model="vgg16"), "--out", "x.safetensors"],
                               r"model vgg16.*model loaded is Tiny"),
    "heatmap with stats of another model": (lambda w: HEAT + ["--stats", stats_with(w, model="vgg16"),
                                                              "--out-dir", "h", "b.png"], r"vgg16.*Tiny"),
    # edit files
    "edit file with scalar tensors": (lambda w: ["predict", "--edit", edit_with(w, scalar=True), "a.png"],
                                      r"E2.safetensors"),
    "edit file with JSON nested 100,000 deep": (lambda w: ["predict", "--edit", edit_with(w, deep=True), "a.png"],
                                                r"nested too deeply"),
    "edit file whose meta is not an object": (lambda w: ["predict", "--edit", edit_with(w, meta=[1]), "a.png"],
                                              r"meta is a list"),
    "edit made for another model": (lambda w: ["predict", "--edit", edit_with(w, model="vgg16"), "a.png"],
                                    r"made for model vgg16.*Tiny"),
    "edit of another model's layer names the model": (
        lambda w: ["predict", "--edit", edit_with(w, model="efficientnet-lite0", layer="_blocks.15._project_conv"),
                   "a.png"], r"made for model efficientnet-lite0"),
    "predict an edit ×1e150": (lambda w: ["predict", "--json", "--edit", edit_with(w, scale=1e150), "a.png"],
                               r"NaN or inf"),
    "predict an edit with ΔW up to 3e38 (finite weights, outputs overflow)": (
        lambda w: ["predict", "--json", "--edit", edit_with(w, delta_max=3e38), "a.png"], r"NaN or inf"),
    "evaluate an edit ×1e150": (lambda w: ["evaluate", "--data", "data", "--quiet", "--out", "ev", "--edit",
                                           edit_with(w, scale=1e150)], r"NaN or inf"),
    "evaluate an edit with ΔW up to 3e38": (lambda w: ["evaluate", "--data", "data", "--quiet", "--out", "ev",
                                                       "--edit", edit_with(w, delta_max=3e38)], r"NaN or inf"),
    "reconstruct with an edit of another model": (
        lambda w: ["reconstruct", "--stage", "key", "--layer", LAYER, "--image", "a.png", "--mask", "m.png",
                   "--compare", "b=b.png", "--edit", edit_with(w, model="vgg16"), "--out-dir", "rec"], r"vgg16"),
    "inverse-edit with statistics of another model": (
        lambda w: ["inverse-edit", "--layer", LAYER, "--original", "a.png", "--manipulated", "man.png", "--mask",
                   "m.png", "--stats", inverse_stats(w, model="vgg16"), "--out", "x.safetensors"], r"vgg16.*Tiny"),
    "inverse-edit --solver fourier with a spectrum of another model": (
        lambda w: ["inverse-edit", "--solver", "fourier", "--view", "4", "--layer", LAYER, "--original", "a.png",
                   "--manipulated", "man.png", "--mask", "m.png", "--stats", spectrum_of(w, model="vgg16"),
                   "--out", "x.safetensors"], r"vgg16.*Tiny"),
    "evaluate an edit of another model": (lambda w: ["evaluate", "--data", "data", "--quiet", "--out", "ev",
                                                     "--edit", edit_with(w, model="vgg16")], r"vgg16"),
    # nothing written on error
    "heatmap with a corrupt second image": (
        lambda w: ((w / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg"),
                   HEAT + ["--out-dir", "heat", "b.png", "bad.jpg"])[1], r"bad.jpg"),
    "merge-stats with a missing shard": (lambda w: ["merge-stats", "--out", "M.safetensors", shard_part(w)],
                                         r"shards 1/2 are missing.*--allow-missing"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(capsys, work, case):
    make, message = CASES[case]
    if "without a GPU" in case and CUDA:
        pytest.skip("this machine has a GPU")
    argv = make(work)
    weights = package_weights()
    before, weights_before = _listing(work), weights.stat()
    code, out, err = _run(capsys, argv)
    assert code == 2, (out, err)
    lines = [ln for ln in err.splitlines() if ln.startswith("rulewriter: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err and "NaN" not in out, err
    assert re.search(message, lines[0]), lines[0]
    assert _listing(work) == before
    assert weights.stat().st_mtime_ns == weights_before.st_mtime_ns and weights.stat().st_size == weights_before.st_size


# ------------------------------------------------------------------------------------------ what bad input is not
def test_force_uses_statistics_and_edits_of_another_model(capsys, work):
    code, _, err = _run(capsys, EDIT + ["--stats", stats_with(work, model="vgg16"), "--force", "--out", "x.safetensors"])
    assert code == 0, err
    code, out, err = _run(capsys, ["predict", "--json", "--force", "--edit", edit_with(work, model="vgg16"), "a.png"])
    assert code == 0 and json.loads(out)[0]["top5"], err


def test_merge_stats_allow_missing(capsys, work):
    part = shard_part(work)
    code, out, err = _run(capsys, ["merge-stats", "--json", "--allow-missing", "--out", "M.safetensors", part])
    assert code == 0, err
    assert json.loads(out)["missing_shards"] == ["1/2"] and (work / "M.safetensors").is_file()


def test_weights_errors_name_the_option(capsys, work, monkeypatch):
    from rulewriter.errors import ModelError

    def refuse(*a, **kw):  # the torchvision branch's message (torchvision is optional)
        raise ModelError("no weights for resnet18: weights= was not given and the torch hub cache has no "
                         "resnet18-f37072fd.pth; pass weights=<path to a .pth file>, or weights='none'")

    monkeypatch.setattr(registry, "load_classifier", refuse)
    code, _, err = _run(capsys, ["predict", "--model", "resnet18", "a.png"])
    assert code == 2 and "weights=" not in err
    assert "--weights was not given" in err and "--weights <path" in err and "--weights none" in err


def test_an_os_error_during_the_work_is_one_line(capsys, work, monkeypatch):
    from rulewriter.core.stats import SecondMoment

    def full(self, path, *a, **kw):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(SecondMoment, "save", full)
    code, _, err = _run(capsys, STATS + ["--out", "C3.safetensors"])
    assert code == 2 and err.splitlines()[-1] == "rulewriter: error: No space left on device: C3.safetensors"
    assert "Traceback" not in err


def test_ctrl_c_is_one_line_and_exit_130(capsys, work, monkeypatch):
    import rulewriter.core.stats as stats_mod

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(stats_mod, "collect_second_moments", interrupted)
    before = _listing(work)
    code, _, err = _run(capsys, STATS + ["--out", "C3.safetensors"])
    assert code == 130 and err.count("rulewriter: error: interrupted") == 1 and "Traceback" not in err
    assert _listing(work) == before


def test_interrupted_statistics_keep_their_partial_checkpoint(work):
    from rulewriter.core.stats import collect_second_moment
    from rulewriter.models.data import ImageDataset, list_images

    clf = tiny_classifier()

    class Stops(ImageDataset):
        def __getitem__(self, i):
            if i == 4:
                raise KeyboardInterrupt
            return super().__getitem__(i)

    ds = Stops(list_images(work / "photos"), clf.preprocess)
    with pytest.raises(KeyboardInterrupt):
        collect_second_moment(clf, LAYER, ds, batch_size=1, checkpoint_every=1, cache_dir=work / "cache",
                              progress=False)
    assert list((work / "cache").glob("*.partial-*.safetensors"))


# ------------------------------------------------------------------------------------------ the statistics cache
def _cache_entry(work: Path) -> Path:
    (entry,) = [p for p in (work / "cache").glob("stats-*.safetensors") if ".partial-" not in p.name]
    return entry


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_cache_entry_is_rebuilt_with_a_warning(capsys, work, damage):
    from rulewriter.core.stats import SecondMoment

    argv = STATS[:-2] + ["--quiet", "--cache-dir", "cache", "--out", "S1.safetensors"]
    assert _run(capsys, argv)[0] == 0
    entry = _cache_entry(work)
    good = SecondMoment.load(entry).moment()
    data = bytearray(entry.read_bytes())
    if damage == "flip":  # bits flipped after an intact header: C near 1e300
        data[-8:] = np.array([1e300], np.float64).tobytes()
        entry.write_bytes(bytes(data))
        with pytest.raises(Exception, match="corrupt"):
            SecondMoment.load(entry)
    else:
        entry.write_bytes(bytes(data[: len(data) // 2]))
    code, _, err = _run(capsys, argv[:-1] + ["S2.safetensors"])
    assert code == 0, err
    assert "rulewriter: warning:" in err and "rebuilt" in err and "Traceback" not in err
    assert torch.equal(SecondMoment.load("S2.safetensors").moment(), good)
    assert torch.equal(SecondMoment.load(entry).moment(), good)  # the entry itself is whole again


def test_a_damaged_key_spectrum_cache_entry_is_rebuilt(work):
    from rulewriter.errors import StatsError
    from rulewriter.extensions.fourier import KeySpectrum, collect_key_spectrum

    clf = tiny_classifier()
    first = collect_key_spectrum(clf, LAYER, work / "photos", cache_dir=work / "cache", progress=False)
    (entry,) = (work / "cache").glob("spectrum-*.safetensors")
    hit = collect_key_spectrum(clf, LAYER, work / "photos", cache_dir=work / "cache", progress=False)
    assert hit.source == entry and first.source is None
    data = bytearray(entry.read_bytes())
    data[-8:] = np.array([1e300], np.float64).tobytes()
    entry.write_bytes(bytes(data))
    with pytest.raises(StatsError, match="corrupt"):
        KeySpectrum.load(entry)
    with pytest.warns(UserWarning, match="damaged and is rebuilt"):
        again = collect_key_spectrum(clf, LAYER, work / "photos", cache_dir=work / "cache", progress=False)
    assert again.source is None and torch.equal(again.spec, first.spec)
    assert torch.equal(KeySpectrum.load(entry).spec, first.spec)


def test_a_cache_hit_is_said(capsys, work):
    argv = STATS[:-2] + ["--quiet", "--cache-dir", "cache"]
    code, _, err = _run(capsys, argv)
    assert code == 0 and "cached" not in err
    code, _, err = _run(capsys, argv)
    assert code == 0 and "using cached statistics" in err and str(_cache_entry(work).name) in err


def test_stale_temp_files_of_dead_processes_are_removed(capsys, work):
    import subprocess

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = work / "cache" / f".stats-x.safetensors.{dead}.0123456789ab.tmp"
    mine = work / "cache" / f".stats-y.safetensors.{os.getpid()}.0123456789ab.tmp"
    young = work / "cache" / f".stats-z.safetensors.{dead}.ba9876543210.tmp"
    for p in (stale, mine, young):
        p.write_bytes(b"half a file")
    old = os.stat(stale).st_mtime - 3600
    os.utime(stale, (old, old))
    os.utime(mine, (old, old))
    assert _run(capsys, STATS[:-2] + ["--quiet", "--cache-dir", "cache"])[0] == 0
    assert not stale.exists() and mine.exists() and young.exists()


# ------------------------------------------------------------------------------------------ writes as a pair
def test_a_blocked_sidecar_leaves_no_safetensors(work):
    from rulewriter.core.edit import Edit

    e = Edit.load(work / "E.safetensors")
    (work / "new.safetensors.json").mkdir()
    with pytest.raises(OSError):
        e.save(work / "new.safetensors")
    assert not (work / "new.safetensors").exists()
    assert not list(work.glob(".*.tmp"))
    # Over an existing pair, a failed second write keeps the first file's old bytes.
    old = (work / "E.safetensors").read_bytes()
    (work / "E.safetensors.json").unlink()
    (work / "E.safetensors.json").mkdir()
    with pytest.raises(OSError):
        e.save(work / "E.safetensors")
    assert (work / "E.safetensors").read_bytes() == old and not list(work.glob(".*.tmp"))


# ------------------------------------------------------------------------------------------ new users' stumbles
def test_heatmaps_share_one_scale_with_a_colour_bar_and_take_a_singular_c(capsys, work):
    from rulewriter.core.stats import SecondMoment

    s = SecondMoment.load(work / "C.safetensors")
    d = s.dim  # a key channel that is always zero: C is singular, C + εI is not
    s.outer[0, :], s.outer[:, 0], s.sum[0] = 0, 0, 0
    s.save(work / "Csing.safetensors")
    code, out, err = _run(capsys, HEAT + ["--stats", "Csing.safetensors", "--out-dir", "heat", "--json",
                                          "a.png", "b.png"])
    assert code == 0, err
    rows = json.loads(out)
    assert d and len(rows) == 2 and len({r["scale_max"] for r in rows}) == 1
    assert max(r["max"] for r in rows) == pytest.approx(rows[0]["scale_max"], rel=1e-6)
    assert Path(rows[0]["colorbar"]).is_file() and all(Path(r["heatmap"]).is_file() for r in rows)


def test_a_jpeg_mask_is_thresholded_at_half(tmp_path):
    from rulewriter.concepts.masks import load_mask

    m = np.zeros((64, 64), np.uint8)
    m[16:48, 16:48] = 255
    Image.fromarray(m).save(tmp_path / "m.jpg", quality=60)
    Image.fromarray(m).save(tmp_path / "m.png")
    jpg = load_mask(tmp_path / "m.jpg")
    assert set(np.unique(jpg)) <= {0.0, 1.0}
    assert abs(int(jpg.sum()) - int(load_mask(tmp_path / "m.png").sum())) <= 64  # not widened by the noise


def test_evaluate_progress_counts_images(work, monkeypatch):
    import tqdm.auto

    from rulewriter.studies.evaluate import predict

    seen = {}
    real = tqdm.auto.tqdm

    def recording(*a, **kw):
        seen.update(kw)
        return real(*a, **{**kw, "disable": True})

    monkeypatch.setattr(tqdm.auto, "tqdm", recording)
    clf = tiny_classifier()
    images = sorted((work / "photos").glob("*.png"))
    predict(clf, images, [0] * len(images), batch_size=4, progress=True)
    assert seen["total"] == len(images) and seen["unit"] == "img"
