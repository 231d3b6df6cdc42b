"""``rulewriter demo`` end to end on EfficientNet-Lite0 with scikit-image's photos (about 20 s on 2 CPUs)."""
from __future__ import annotations

import io
import json

import pytest

pytest.importorskip("skimage", reason="the demo's photos and textures come from scikit-image (rulewriter[demo])")

from rulewriter.core.edit import Edit  # noqa: E402

UNRELATED = ("chelsea", "astronaut", "rocket", "motorcycle_left")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from rulewriter.studies.demo import run_demo

    out = tmp_path_factory.mktemp("demo")
    text = io.StringIO()
    summary = run_demo(out, samples=48, quiet=True, stream=text, cache_dir=tmp_path_factory.mktemp("cache"))
    return out, summary, text.getvalue()


def test_a_second_run_reads_its_statistics_from_the_cache_and_says_so(demo, tmp_path):
    from rulewriter.studies.demo import run_demo

    out, first, text = demo
    assert first["stats"]["cached"] is None and "read from the cache" not in text
    again = io.StringIO()
    second = run_demo(tmp_path / "again", samples=48, quiet=True, stream=again, cache_dir=first["stats"]["cache_dir"])
    assert second["stats"]["cached"] and "read from the cache" in again.getvalue()
    assert second["stats"]["keys"] == first["stats"]["keys"] and second["images"] == first["images"]
    assert (tmp_path / "again" / "heatmaps" / "colorbar.png").is_file()


def test_page_and_files(demo):
    out, summary, _ = demo
    page = (out / "index.html").read_text(encoding="utf-8")
    assert summary["layer"] in page and "_blocks.15._project_conv" in page
    assert page.count('class="preds"') >= 9 and "data:image/png;base64," in page
    for name in ("original.png", "mask.png", "manipulated.png", "held_out.png", "edit.safetensors.json"):
        assert (out / name).is_file(), name
    for name in summary["images"]:
        assert (out / "heatmaps" / f"{name}.png").is_file(), name
    assert summary["paths"]["index"] == str(out / "index.html")
    json.dumps(summary)  # JSON-able, as `rulewriter demo --json` prints it


def test_edit_loads(demo):
    out, summary, _ = demo
    edit = Edit.load(out / "edit.safetensors")
    assert [u.layer for u in edit.updates] == [summary["layer"]] and edit.updates[0].rank == 1


def test_statistics_are_labelled(demo):
    _, summary, text = demo
    assert summary["stats"]["kind"] == "augmented" and summary["stats"]["images"] == 48
    assert summary["stats"]["keys"] == 48 * 49
    assert "--stats-data" in text and "augment" in text


def test_the_edit_fixes_the_manipulated_photo(demo):
    _, summary, text = demo
    im = summary["images"]
    assert im["original"]["before"]["label"] == "espresso"
    assert im["manipulated"]["before"]["label"] != "espresso"  # the texture broke it
    assert im["manipulated"]["after"]["label"] == im["original"]["after"]["label"]
    assert summary["fixed"] is True
    assert "top-1 changed" in text


def test_the_original_keeps_its_top1(demo):
    _, summary, _ = demo
    o = summary["images"]["original"]
    assert o["after"]["label"] == o["before"]["label"]
    assert o["tv_distance"] < 0.05


def test_unrelated_photos_keep_their_top1(demo):
    _, summary, _ = demo
    for name in UNRELATED:
        if name not in summary["images"]:
            continue  # an older scikit-image without this photo
        r = summary["images"][name]
        assert r["after"]["label"] == r["before"]["label"], (name, r)
        assert r["tv_distance"] < 0.05, (name, r)


def test_predict_cli_with_the_saved_edit(demo, capsys):
    from rulewriter.cli import main

    out, _, _ = demo
    assert main(["predict", "--edit", str(out / "edit.safetensors"), "--json", str(out / "manipulated.png")]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res[0]["top5"][0]["label"] == "espresso"
