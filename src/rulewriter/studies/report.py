"""Small, dependency-free HTML helpers: one self-contained page of figure cards and prediction tables.

Everything here returns HTML *fragments* as strings, with every piece of text passed through
:func:`html.escape`, so labels, captions and file names cannot inject markup. Images are embedded as
base64 PNG data URIs by default, so a page is a single file that can be mailed or archived.

Example::

    from rulewriter.studies.report import card, figure, html_page, prediction_table, section, write_html

    before = [("espresso", 0.96), ("cup", 0.01)]
    after = [("espresso", 0.95), ("cup", 0.02)]
    cards = [card("coffee", [figure(img, "input"), figure(heat, "where the edit acts"),
                            prediction_table(before, after)])]
    page = html_page("rulewriter demo", [section("Before and after", cards, intro="One rule rewritten.")])
    write_html("out/index.html", page)          # atomic: readers never see a half-written page

Building blocks: :func:`html_page` (the page, with a small inline stylesheet), :func:`section` (a titled
block whose items sit in a responsive grid), :func:`card` (one grid cell), :func:`figure` (an image with a
caption), :func:`prediction_table` (top-k before/after, the top-1 highlighted when the edit changed it),
:func:`paragraph`, :func:`code_block`, and the atomic writers :func:`write_html` and :func:`save_png`.
"""
from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path
from typing import Sequence, Union

from PIL import Image

from ..atomic import atomic_bytes

__all__ = [
    "CSS",
    "card",
    "code_block",
    "data_table",
    "figure",
    "figure_image",
    "html_page",
    "image_data_uri",
    "paragraph",
    "prediction_table",
    "pyplot",
    "save_figure",
    "save_png",
    "section",
    "write_html",
]

ImageSource = Union[Image.Image, str, Path]
Prediction = tuple[str, float]

#: The page's inline stylesheet: a readable column, a grid of cards, compact tables.
CSS = """
:root { --fg: #1d1f23; --muted: #5f6670; --line: #dde1e6; --bg: #f6f7f9; --card: #fff;
        --good: #0b7a3e; --goodbg: #e3f5ea; --warn: #9a5b00; --warnbg: #fff3dc; }
* { box-sizing: border-box; }
body { margin: 0; padding: 24px; background: var(--bg); color: var(--fg);
       font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
main { max-width: 1280px; margin: 0 auto; }
h1 { font-size: 1.6em; margin: 0 0 .4em; }
h2 { font-size: 1.2em; margin: 1.6em 0 .5em; border-bottom: 1px solid var(--line); padding-bottom: .2em; }
h3 { font-size: 1em; margin: 0 0 .5em; }
p { margin: .4em 0 .8em; max-width: 75ch; }
.muted { color: var(--muted); }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(280px, 1fr)); gap: 14px; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 12px; }
.card.wide { grid-column: 1 / -1; }
.card.wide .figs { grid-template-columns: repeat(auto-fit, minmax(200px, 360px)); }
.card .figs { display: grid; grid-template-columns: repeat(auto-fit, minmax(120px, 1fr)); gap: 8px; }
figure { margin: 0 0 8px; }
figure img { display: block; width: 100%; height: auto; border-radius: 4px; image-rendering: auto; }
figcaption { font-size: .85em; color: var(--muted); margin-top: 3px; }
table.preds { width: 100%; border-collapse: collapse; font-size: .88em; margin-top: 6px; }
table.preds th, table.preds td { text-align: left; padding: 2px 6px; border-bottom: 1px solid var(--line); }
table.preds td.p { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
table.preds th.p { text-align: right; }
table.preds tr.top td { font-weight: 600; }
table.preds td.changed { background: var(--goodbg); color: var(--good); }
.badge { display: inline-block; font-size: .78em; padding: 0 6px; border-radius: 10px; margin-left: 6px;
         background: var(--goodbg); color: var(--good); font-weight: 600; }
.badge.same { background: #eceff3; color: var(--muted); }
pre { background: #272b33; color: #e8eaed; padding: 10px 12px; border-radius: 6px; overflow-x: auto;
      font-size: .85em; }
.note { background: var(--warnbg); color: var(--warn); border-radius: 6px; padding: 8px 12px; max-width: 90ch; }
"""


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def image_data_uri(img: ImageSource, max_side: int | None = None) -> str:
    """A ``data:image/png;base64,...`` URI of an image (a PIL image or an image file), for ``<img src>``.

    ``max_side`` shrinks a larger image (aspect kept) before encoding, to keep the page small.

    Example::

        >>> image_data_uri(Image.new("RGB", (2, 2))).startswith("data:image/png;base64,")
        True
    """
    if isinstance(img, Image.Image):
        pic = img
    else:
        with Image.open(img) as opened:
            opened.load()
            pic = opened.copy()
    if pic.mode not in ("RGB", "RGBA", "L", "LA", "1", "P"):
        pic = pic.convert("RGB")
    if max_side is not None and max(pic.size) > max_side > 0:
        f = max_side / max(pic.size)
        pic = pic.resize((max(1, round(pic.width * f)), max(1, round(pic.height * f))), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    pic.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def figure(
    img: ImageSource, caption: str, *, embed: bool = True, alt: str | None = None, max_side: int | None = None
) -> str:
    """An image with a caption, as ``<figure>``.

    Args:
        img: a PIL image or a path to an image file.
        caption: text under the image (escaped).
        embed: embed the pixels as a base64 PNG (the page stays one self-contained file). With
            ``embed=False`` the path is linked as given (relative paths resolve against the page), which
            needs ``img`` to be a path.
        alt: alternative text; defaults to the caption.
        max_side: when embedding, shrink the image so its longer side is at most this many pixels.

    Example::

        >>> "<script>" in figure(Image.new("RGB", (2, 2)), "<script>alert(1)</script>")
        False
    """
    if embed:
        src = image_data_uri(img, max_side)
    elif isinstance(img, (str, Path)):
        src = Path(img).as_posix()
    else:
        raise ValueError("figure(embed=False) links a file, so img must be a path; save the image first or embed it")
    return (f'<figure><img src="{_esc(src)}" alt="{_esc(caption if alt is None else alt)}">'
            f"<figcaption>{_esc(caption)}</figcaption></figure>")


def _prob(p: float) -> str:
    return f"{float(p):.3f}"


def prediction_table(
    before: Sequence[Prediction],
    after: Sequence[Prediction] | None = None,
    *,
    headers: tuple[str, str] = ("before", "after"),
) -> str:
    """Top-k predictions as a table: ``(label, probability)`` rows, best first; two column groups with ``after``.

    When ``after`` is given and its top-1 label differs from ``before``'s, the new top-1 cells carry the
    class ``changed`` (highlighted) and the header gets a "top-1 changed" badge; otherwise an "unchanged"
    badge.

    Example::

        >>> t = prediction_table([("cup", 0.08)], [("espresso", 0.91)])
        >>> 'class="changed"' in t
        True
    """
    b = [(str(lab), float(p)) for lab, p in before]
    a = None if after is None else [(str(lab), float(p)) for lab, p in after]
    changed = bool(a and b and a[0][0] != b[0][0])
    rows = max(len(b), len(a) if a is not None else 0)
    head = f'<th>{_esc(headers[0])}</th><th class="p">p</th>'
    if a is not None:
        badge = ('<span class="badge">top-1 changed</span>' if changed
                 else '<span class="badge same">top-1 unchanged</span>')
        head += f'<th>{_esc(headers[1])}{badge}</th><th class="p">p</th>'
    body = []
    for i in range(rows):
        cells = []
        for preds, highlight in ((b, False), (a, changed)):
            if preds is None:
                continue
            if i < len(preds):
                cls = ' class="changed"' if (highlight and i == 0) else ""
                pcls = ' class="p changed"' if (highlight and i == 0) else ' class="p"'
                cells.append(f"<td{cls}>{_esc(preds[i][0])}</td><td{pcls}>{_prob(preds[i][1])}</td>")
            else:
                cells.append('<td></td><td class="p"></td>')
        row_cls = ' class="top"' if i == 0 else ""
        body.append(f"<tr{row_cls}>{''.join(cells)}</tr>")
    return f'<table class="preds"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def paragraph(text: str, *, cls: str | None = None) -> str:
    """``<p>`` with escaped text; ``cls`` adds a CSS class (``"muted"``, ``"note"``)."""
    attr = f' class="{_esc(cls)}"' if cls else ""
    return f"<p{attr}>{_esc(text)}</p>"


def code_block(text: str) -> str:
    """``<pre>`` with escaped text, for commands to copy."""
    return f"<pre>{_esc(text)}</pre>"


def card(title: str, parts: Sequence[str], *, subtitle: str | None = None, wide: bool = False) -> str:
    """One grid cell: a title, an optional muted subtitle, then HTML fragments (figures go side by side).

    ``parts`` are fragments from this module (already escaped); consecutive ``<figure>`` fragments are
    laid out in a row. ``wide=True`` makes the card span the whole row of the grid.
    """
    out = [f"<h3>{_esc(title)}</h3>"]
    if subtitle:
        out.append(paragraph(subtitle, cls="muted"))
    figs: list[str] = []
    for p in list(parts) + [""]:
        if p.startswith("<figure"):
            figs.append(p)
            continue
        if figs:
            out.append(f'<div class="figs">{"".join(figs)}</div>')
            figs = []
        if p:
            out.append(p)
    cls = "card wide" if wide else "card"
    return f'<div class="{cls}">{"".join(out)}</div>'


def section(
    title: str,
    items: Sequence[str] = (),
    *,
    intro: str | Sequence[str] | None = None,
    body: Sequence[str] = (),
) -> str:
    """A titled block: intro paragraphs (plain text, escaped), ``items`` (e.g. cards) in a grid, then ``body``.

    ``items`` and ``body`` are HTML fragments from this module; ``body`` (e.g. a :func:`code_block`) goes
    below the grid, full width.
    """
    intro_list = [intro] if isinstance(intro, str) else list(intro or [])
    text = "".join(paragraph(t) for t in intro_list)
    grid = f'<div class="grid">{"".join(items)}</div>' if items else ""
    return f"<section><h2>{_esc(title)}</h2>{text}{grid}{''.join(body)}</section>"


def html_page(title: str, sections: Sequence[str]) -> str:
    """A complete HTML5 document: the title (escaped), the inline :data:`CSS`, and the sections in order.

    Example::

        >>> html_page("a <b>", [section("s")]).count("<h1>a &lt;b&gt;</h1>")
        1
    """
    t = _esc(title)
    return (
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{t}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n<h1>{t}</h1>\n"
        + "\n".join(sections)
        + "\n</main>\n</body>\n</html>\n"
    )


def write_html(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` as UTF-8 atomically (a temp file in the same folder, then ``os.replace``); returns the path.

    The folder is created if needed. On any error the temp file is removed and ``path`` is left as it was.
    """
    data = text.encode("utf-8")
    return atomic_bytes(path, data)


def save_png(path: str | os.PathLike[str], img: Image.Image) -> Path:
    """Save a PIL image as PNG atomically; returns the path."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return atomic_bytes(path, buf.getvalue())


def data_table(headers: Sequence[object], rows: Sequence[Sequence[object]]) -> str:
    """A plain table of numbers or text (every cell escaped), styled like :func:`prediction_table`.

    Cells that look numeric (``12``, ``-3.5``, ``87.50%``, ``+1.0``) are right-aligned.

    Example::

        >>> data_table(["test", "accuracy"], [["normal", "80.00%"]]).count("<td")
        2
    """

    def numeric(cell: object) -> bool:
        text = str(cell).strip().rstrip("%").lstrip("+−-")
        return bool(text) and text.replace(".", "", 1).replace("/", "", 1).isdigit()

    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = "".join(f'<td class="p">{_esc(c)}</td>' if numeric(c) else f"<td>{_esc(c)}</td>" for c in row)
        body.append(f"<tr>{cells}</tr>")
    return f'<table class="preds"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend, imported when a figure is first drawn.

    Figures are an optional extra: without matplotlib this raises a clear
    :class:`~rulewriter.errors.RulewriterError` instead of an ImportError deep in a report.

    Example::

        >>> fig, ax = pyplot().subplots(figsize=(2, 1))          # doctest: +SKIP
    """
    from ..errors import RulewriterError

    try:
        import matplotlib

        matplotlib.use("Agg", force=False)  # never open a window; a backend already chosen is kept
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RulewriterError("figures need matplotlib: pip install 'rulewriter[eval]'") from e
    return plt


def figure_image(fig, dpi: int | None = None) -> Image.Image:
    """Render a matplotlib figure to a PIL image and close the figure (so pyplot does not keep it).

    Example::

        >>> import matplotlib.pyplot as plt                     # doctest: +SKIP
        >>> figure_image(plt.figure(figsize=(2, 1), dpi=50)).size  # doctest: +SKIP
        (100, 50)
    """
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    buf.seek(0)
    with Image.open(buf) as img:
        img.load()
        return img.copy()


def save_figure(path: str | os.PathLike[str], fig, dpi: int | None = None) -> Path:
    """Save a matplotlib figure as PNG atomically, close it, and return the path.

    Example::

        >>> save_figure("out/roc.png", fig)                     # doctest: +SKIP
        PosixPath('out/roc.png')
    """
    return save_png(path, figure_image(fig, dpi))


def percent(x: float | None) -> str:
    """A fraction as a percentage with two decimals, or an em dash for None: ``percent(0.125) == "12.50%"``."""
    return "—" if x is None else f"{100 * x:.2f}%"
