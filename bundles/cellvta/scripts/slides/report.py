"""A slide's result as one page a person opens: ``<slide>_report.html``.

The page is self-contained (inline CSS, images embedded as base64 PNG, no script, no server, no external
reference): the overlay thumbnail at page width with every nucleus a dot of ``DOT`` page pixels in its class
colour (a one-pixel dot of the thumbnail would vanish at page width), a density heatmap per class (nuclei per
mm² of slide on a grid of ``report_grid_um`` squares, squares without analysed tissue left blank), the tissue-class
map and fractions when the network has a tissue head, the class counts and fractions, the model, the run time and
every setting. It is made from the slide's summary (``<slide>.json``'s content) and its published outputs
(``<slide>.parquet``, ``_overlay.png``, ``_mask.png``, ``_tissue.png``).
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from ..files import write_text_atomic
from ..inference.writers import class_color

__all__ = ["class_density", "write_report"]

PAGE_WIDTH = 1040  # pixels of the page's images, the width of its column
DOT = 3  # side in page pixels of a nucleus's dot on the overlay

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; word-break: break-all; }
h2 { font-size: 1.15em; border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 1.6em; }
.lead { color: #555; margin-top: 0; }
table { border-collapse: collapse; font-size: 0.92em; }
td, th { padding: 0.25em 0.8em 0.25em 0; text-align: left; vertical-align: top; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
.swatch { display: inline-block; width: 0.9em; height: 0.9em; border: 1px solid #555; vertical-align: middle; }
img { max-width: 100%; height: auto; }
img.map { image-rendering: pixelated; width: 100%; max-width: 700px; border: 1px solid #ccc; }
.settings td:first-child { color: #555; }
code { font-size: 0.9em; word-break: break-all; }
"""


def class_density(x: np.ndarray, y: np.ndarray, types: np.ndarray, num_classes: int, width: int, height: int,
                  mpp: float, grid_um: float) -> np.ndarray:
    """Nuclei per mm² of slide, per class, on a grid of ``grid_um`` squares.

    Args:
        x, y: (N,) level-0 pixel centroids.
        types: (N,) class ids (0 is background, counted nowhere).
        num_classes: C, class ids below it are counted.
        width, height: the slide's level-0 size in pixels.
        mpp: microns per level-0 pixel.
        grid_um: side of a grid square in microns.

    Returns:
        (C - 1, rows, cols) float64, class ``c`` at index ``c - 1``; squares cut by the slide's edge are divided
        by their area on the slide.
    """
    step = grid_um / mpp  # level-0 pixels per square
    cols, rows = max(1, int(np.ceil(width / step))), max(1, int(np.ceil(height / step)))
    keep = (types > 0) & (types < num_classes)
    col = np.clip((x[keep] / step).astype(np.int64), 0, cols - 1)
    row = np.clip((y[keep] / step).astype(np.int64), 0, rows - 1)
    counts = np.bincount((types[keep].astype(np.int64) - 1) * rows * cols + row * cols + col,
                         minlength=(num_classes - 1) * rows * cols).reshape(num_classes - 1, rows, cols)
    square_w = np.minimum(step, width - np.arange(cols) * step) * mpp / 1000  # mm
    square_h = np.minimum(step, height - np.arange(rows) * step) * mpp / 1000
    return counts / (square_h[:, None] * square_w[None, :])


def _png(image: np.ndarray) -> str:
    """``data:`` URI of an (H, W, 3) uint8 RGB image."""
    ok, data = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError("could not encode a report image as PNG")
    return "data:image/png;base64," + base64.b64encode(data.tobytes()).decode("ascii")


def _png_file(path: Path) -> str:
    """``data:`` URI of a PNG file."""
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _overlay(path: Path, x: np.ndarray, y: np.ndarray, colours: np.ndarray, width: int, height: int) -> np.ndarray:
    """(h, w, 3) uint8 RGB: the overlay thumbnail at ``PAGE_WIDTH`` (at most) with a ``DOT``-pixel square per nucleus.

    Args:
        path: the slide's ``_overlay.png``.
        x, y: (N,) level-0 pixel centroids.
        colours: (N, 3) uint8 RGB of each nucleus.
        width, height: the slide's level-0 size.
    """
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"{path}: overlay not readable")
    scale = min(1.0, PAGE_WIDTH / image.shape[1])
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    image = cv2.cvtColor(cv2.resize(image, size, interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB)
    h, w = image.shape[:2]
    cols, rows = (x * w / width).astype(np.int64) - DOT // 2, (y * h / height).astype(np.int64) - DOT // 2
    for dy in range(DOT):
        for dx in range(DOT):
            image[np.clip(rows + dy, 0, h - 1), np.clip(cols + dx, 0, w - 1)] = colours
    return image


def _density_figure(density: np.ndarray, names: Sequence[str], analysed: np.ndarray) -> str:
    """``data:`` URI of small-multiple heatmaps, one per class of the (C, rows, cols) ``density``, squares where
    ``analysed`` (rows, cols) is False blank."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(names)
    columns = min(n, 4)
    lines = -(-n // columns)
    rows, cols = density.shape[1:]
    panel = 3.4 * min(1.6, max(0.6, rows / max(cols, 1)))
    figure = Figure(figsize=(3.9 * columns, panel * lines + 0.4), dpi=80, layout="constrained")
    FigureCanvasAgg(figure)
    for k, name in enumerate(names):
        axes = figure.add_subplot(lines, columns, k + 1)
        shown = np.ma.masked_where(~analysed, density[k])
        image = axes.imshow(shown, cmap="magma", interpolation="nearest", vmin=0)
        axes.set_title(name, fontsize=10)
        axes.set_xticks([])
        axes.set_yticks([])
        figure.colorbar(image, ax=axes, shrink=0.85).set_label("nuclei / mm²", fontsize=8)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _analysed_squares(mask_path: Path, shape: tuple[int, int], width: int, height: int, step_px: float) -> np.ndarray:
    """(rows, cols) bool: grid squares holding any analysed pixel of the slide's ``_mask.png`` (thumbnail)."""
    mask = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise ValueError(f"{mask_path}: analysed-area mask not readable")
    ys, xs = np.nonzero(mask)
    rows, cols = shape
    analysed = np.zeros(shape, dtype=bool)
    analysed[np.minimum((ys * height / mask.shape[0] / step_px).astype(np.int64), rows - 1),
             np.minimum((xs * width / mask.shape[1] / step_px).astype(np.int64), cols - 1)] = True
    return analysed


def _swatch(colour: Sequence[int]) -> str:
    r, g, b = (int(c) for c in colour)
    return f'<span class="swatch" style="background: rgb({r}, {g}, {b})"></span>'


def _rows(pairs: Sequence[tuple[str, str]]) -> str:
    return "".join(f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>" for k, v in pairs)


def write_report(path: str | Path, summary: dict, output_dir: str | Path, grid_um: float) -> Path:
    """Write the slide's report page (see the module docstring) atomically at ``path``.

    Args:
        path: ``<output_dir>/<slide>_report.html``.
        summary: the slide's summary (``<slide>.json``): ``slide, width, height, mpp, tiles, tiles_total, cells,
            cells_per_class, class_colours, tissue, settings, predictor, classifier, roi, seconds``.
        output_dir: the folder holding the slide's outputs.
        grid_um: side of the density grid's squares in microns.
    """
    import pyarrow.parquet as pq

    output_dir = Path(output_dir)
    name = Path(summary["slide"]).name
    counts = summary["cells_per_class"]
    names = list(counts)
    colours = summary.get("class_colours") or {}
    total = summary["cells"]
    width, height, mpp = summary["width"], summary["height"], summary["mpp"]

    columns = pq.read_table(output_dir / f"{name}.parquet", columns=["x", "y", "type_id"])
    x, y, types = (columns[k].to_numpy() for k in ("x", "y", "type_id"))
    density = class_density(x, y, types, len(names) + 1, width, height, mpp, grid_um)
    palette = np.array([(0, 0, 0)] + [colours.get(n, class_color(i + 1)) for i, n in enumerate(names)], np.uint8)
    overlay = _overlay(output_dir / f"{name}_overlay.png", x, y, palette[np.clip(types, 0, len(names))], width,
                       height)
    analysed = _analysed_squares(output_dir / f"{name}_mask.png", density.shape[1:], width, height, grid_um / mpp)

    class_rows = "".join(
        f'<tr><td>{_swatch(palette[i + 1])}</td><td>{html.escape(n)}</td>'
        f'<td class="n count" data-class="{html.escape(n)}">{c}</td>'
        f'<td class="n">{100 * c / total if total else 0:.1f} %</td></tr>' for i, (n, c) in enumerate(counts.items()))
    class_rows += f'<tr><th></th><th>all</th><th class="n" id="total">{total}</th><th class="n">100 %</th></tr>'
    area_mm2 = width * height * (mpp / 1000) ** 2
    facts = [
        ("Slide", f"<code>{html.escape(str(summary['slide']))}</code>"),
        ("Size", f"{width} × {height} px, {width * mpp / 1000:.2f} × {height * mpp / 1000:.2f} mm "
                 f"({area_mm2:.1f} mm²) at {mpp:.4g} µm/px"),
        ("Analysed", f"{summary['tiles']} of {summary['tiles_total']} tiles"
                     + (f" ({summary['tiles_out_of_focus']} tissue tiles out of focus, left out)"
                        if summary.get("tiles_out_of_focus") else "")
                     + (f", region <code>{html.escape(str(summary['roi']))}</code>" if summary.get("roi") else "")),
        ("Nuclei", f"{total}"),
        ("Model (weights)", f"<code>{html.escape(str(summary.get('predictor') or 'unnamed'))}</code>"),
        ("Cell classifier", f"<code>{html.escape(str(summary['classifier']))}</code>" if summary.get("classifier")
         else "none (the network's type branch)"),
        ("Run time", f"{summary['seconds']:.1f} s"),
    ]
    parts = [
        f"<h1>{html.escape(name)}</h1>",
        f'<p class="lead">CellVTA whole-slide nuclei: {total} nuclei in {len(names)} classes.</p>',
        f"<h2>Slide and run</h2><table>{_rows(facts)}</table>",
        f'<h2>Classes</h2><table class="classes"><tr><th></th><th>class</th><th class="n">nuclei</th>'
        f'<th class="n">fraction</th></tr>{class_rows}</table>',
        f'<h2>Overlay</h2><p class="lead">Every nucleus as a dot in its class colour on the slide thumbnail '
        f'(<code>{html.escape(name)}_overlay.png</code>, shown {overlay.shape[1]} pixels wide).</p>'
        f'<img alt="overlay" src="{_png(overlay)}">',
        f'<h2>Density</h2><p class="lead">Nuclei per mm² of slide in squares of {grid_um:g} µm; squares without '
        f'analysed tissue are blank.</p>'
        f'<img alt="density per class" src="{_density_figure(density, names, analysed)}">',
    ]
    tissue = summary.get("tissue")
    if tissue:
        fractions = tissue["fractions"]
        tissue_rows = "".join(
            f'<tr><td>{_swatch(tissue["colours"][n])}</td><td>{html.escape(n)}</td>'
            f'<td class="n">{100 * fractions[n]:.1f} %</td>'
            f'<td class="n">{tissue["mean_probabilities"][n]:.3f}</td></tr>' for n in tissue["classes"])
        parts.append(
            f'<h2>Tissue</h2><p class="lead">The tissue head\'s class of each analysed tile ({tissue["tiles"]} '
            f'tiles; one square a tile, white: not analysed).</p>'
            f'<img class="map" alt="tissue classes" src="{_png_file(output_dir / tissue["map"])}">'
            f'<table><tr><th></th><th>tissue</th><th class="n">tiles</th><th class="n">mean probability</th></tr>'
            f"{tissue_rows}</table>")
    settings = [(k, f"<code>{html.escape(json.dumps(v))}</code>") for k, v in summary["settings"].items()]
    parts.append(f'<h2>Settings</h2><table class="settings">{_rows(settings)}</table>')
    page = ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(name)}: CellVTA slide report</title><style>{STYLE}</style></head>\n<body>\n"
            + "\n".join(parts) + "\n</body></html>\n")
    return write_text_atomic(path, page)
