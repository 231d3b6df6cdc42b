"""HTML helpers: escaping, embedded PNGs, prediction tables, atomic writes."""
from __future__ import annotations

import base64
import io
import os
import re
from pathlib import Path

import pytest
from PIL import Image

from rulewriter.studies import report
from rulewriter.studies.report import (
    card,
    code_block,
    figure,
    html_page,
    image_data_uri,
    paragraph,
    prediction_table,
    save_png,
    section,
    write_html,
)

EVIL = '<script>alert("x")</script>'


def _decode(fragment: str) -> Image.Image:
    m = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', fragment)
    assert m, fragment[:200]
    return Image.open(io.BytesIO(base64.b64decode(m.group(1))))


def test_caption_and_text_are_escaped():
    frag = figure(Image.new("RGB", (4, 3)), EVIL)
    assert "<script>" not in frag
    assert "&lt;script&gt;" in frag
    page = html_page(EVIL, [section(EVIL, [card(EVIL, [paragraph(EVIL), code_block(EVIL)], subtitle=EVIL)],
                                    intro=EVIL)])
    assert "<script>" not in page
    table = prediction_table([(EVIL, 0.5)], [("a&b", 0.4)], headers=(EVIL, EVIL))
    assert "<script>" not in table and "a&amp;b" in table


def test_figure_embeds_a_decodable_png(tmp_path):
    img = Image.new("RGB", (40, 30), (10, 200, 30))
    pic = _decode(figure(img, "green"))
    assert pic.format == "PNG" and pic.size == (40, 30)
    assert pic.convert("RGB").getpixel((5, 5)) == (10, 200, 30)
    # From a file, and shrunk for the page.
    path = tmp_path / "big.png"
    Image.new("L", (300, 100), 128).save(path)
    small = _decode(figure(path, "from a file", max_side=60))
    assert small.size == (60, 20)
    assert image_data_uri(path).startswith("data:image/png;base64,")


def test_figure_links_a_file_when_not_embedded(tmp_path):
    frag = figure(Path("heatmaps") / 'a"b.png', "linked", embed=False)
    assert 'src="heatmaps/a&quot;b.png"' in frag
    with pytest.raises(ValueError):
        figure(Image.new("RGB", (2, 2)), "no file", embed=False)


def test_table_highlights_a_changed_top1():
    t = prediction_table([("cup", 0.08), ("hen-of-the-woods", 0.08)], [("espresso", 0.89), ("cup", 0.03)])
    cells = re.findall(r'<td class="([^"]*changed[^"]*)">([^<]*)</td>', t)
    assert ("changed", "espresso") in cells and ("p changed", "0.890") in cells
    assert all(text in ("espresso", "0.890") for _, text in cells)  # only the new top-1 is highlighted
    assert "top-1 changed" in t

    same = prediction_table([("espresso", 0.96)], [("espresso", 0.95), ("cup", 0.01)])
    assert "changed" not in same.replace("top-1 unchanged", "")
    assert same.count("<tr") == 3  # header + two rows; the shorter column is padded

    single = prediction_table([("cat", 0.4), ("dog", 0.3)])
    assert single.count("<th>") == 1 and "badge" not in single


def test_page_structure():
    page = html_page("demo", [section("s", [card("c", [figure(Image.new("RGB", (2, 2)), "f")])], intro="hi")])
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")
    assert '<meta charset="utf-8">' in page and "<style>" in page and 'class="grid"' in page
    assert 'class="figs"' in page  # figures of a card sit in a row
    assert 'class="card wide"' in card("w", [], wide=True)


def test_write_html_is_atomic(tmp_path, monkeypatch):
    dest = tmp_path / "sub" / "index.html"
    write_html(dest, "<p>first ✓</p>")
    assert dest.read_text(encoding="utf-8") == "<p>first ✓</p>"
    write_html(dest, "<p>second</p>")
    assert dest.read_text(encoding="utf-8") == "<p>second</p>"
    assert os.listdir(dest.parent) == ["index.html"]  # no temp files left

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(report.os, "replace", boom)
    with pytest.raises(OSError):
        write_html(dest, "<p>third</p>")
    assert dest.read_text(encoding="utf-8") == "<p>second</p>"  # the old page is intact
    assert os.listdir(dest.parent) == ["index.html"]


def test_save_png_round_trip_and_mode(tmp_path):
    old = os.umask(0o022)
    try:
        p = save_png(tmp_path / "x.png", Image.new("RGB", (3, 2), (1, 2, 3)))
    finally:
        os.umask(old)
    assert Image.open(p).getpixel((0, 0)) == (1, 2, 3)
    assert p.stat().st_mode & 0o777 == 0o644  # readable like any file, not mkstemp's 0600
    assert os.listdir(tmp_path) == ["x.png"]
