"""The dashboards' heatmap images: token scores drawn with Pillow as image arrays.

What TensorBoard and W&B get at every snapshot: `layer_heatmap` (tokens x layers) and
`history_heatmap` (tokens x snapshots), each an (H, W, 3) uint8 array drawn with Pillow's
default font in a few milliseconds, so the images stay a small part of the callback's cost.
One colour rule, shared with the report's figures (`figures.py`): a diverging scale centred at
zero (LogAt and NormXLogit are signed), red positive, blue negative.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

ROW_SCALE_LABEL = "score / largest |score| of its step"


def display_token(token: str, *, mathtext: bool = True) -> str:
    """A token as a label: whitespace made visible; ``mathtext`` (matplotlib labels): ``$``
    escaped so it is not read as mathtext (False for the Pillow images, where it is plain)."""
    text = str(token).replace("\n", "\u21b5").replace("\t", "\u2192")
    text = text.replace("$", r"\$") if mathtext else text
    return text if text.strip() else repr(str(token))


def row_scaled(values: np.ndarray) -> np.ndarray:
    """Each row divided by its own largest finite |value| (all-zero rows stay 0)."""
    values = np.asarray(values, dtype=np.float64)
    bound = np.nanmax(np.where(np.isfinite(values), np.abs(values), np.nan), axis=1,
                      initial=0.0, keepdims=True) if values.size else values
    bound = np.where(np.isfinite(bound) & (bound > 0), bound, 1.0)
    return values / bound


def score_bound(values: np.ndarray) -> float:
    """The largest finite |value|: the end of the zero-centred colour scale (1 if none)."""
    finite = values[np.isfinite(values)]
    bound = float(np.abs(finite).max()) if finite.size else 1.0
    return bound if bound > 0 else 1.0


# matplotlib figure costs tens, so the images stay a small part of the callback's cost.

# ColorBrewer's 11-class RdBu, most negative (blue) to most positive (red): matplotlib's RdBu_r.
_RDBU = ("053061", "2166ac", "4393c3", "92c5de", "d1e5f0", "f7f7f7",
         "fddbc7", "f4a582", "d6604d", "b2182b", "67001f")
_ANCHORS = np.array([[int(c[i:i + 2], 16) for i in (0, 2, 4)] for c in _RDBU], dtype=np.float64)
# 255 entries: index 127 is exactly the centre colour (score 0).
_LUT = np.stack([np.interp(np.linspace(0.0, 1.0, 255), np.linspace(0.0, 1.0, len(_RDBU)),
                           _ANCHORS[:, k]) for k in range(3)], axis=1).round().astype(np.uint8)
NAN_RGB = (190, 190, 190)  # a cell without a score: grey, not the white of a zero score
CUE_RGB = (0, 128, 0)  # the bar under a cue word's column, and its label
TEXT_RGB = (29, 29, 31)
FONT_SIZE = 11
PAD = 6
CUE_BAR = 5  # pixels
LEGEND_BAR = 100  # pixels
MAX_LABEL_CHARS = 16  # longer tokens are cut, ending in an ellipsis
# Stand-ins for characters that Pillow's default font cannot draw.
_FALLBACK = {"\u21b5": "\\n", "\u2192": "\\t", "\u2212": "-", "\u2026": "...", "\u00df": "ss"}


def score_rgb(values: np.ndarray, bound: float | None = None) -> np.ndarray:
    """Colours (uint8, ``values.shape + (3,)``) of scores on the zero-centred scale
    -``bound``..+``bound`` (default: the largest finite |value|), red positive, blue
    negative, white 0; non-finite scores are `NAN_RGB` grey."""
    values = np.asarray(values, dtype=np.float64)
    bound = score_bound(values) if bound is None else float(bound)
    if not (math.isfinite(bound) and bound > 0):
        raise ValueError(f"score_rgb: bound={bound!r} must be a positive finite number")
    finite = np.isfinite(values)
    scaled = np.clip(np.where(finite, values, 0.0) / bound, -1.0, 1.0)
    rgb = _LUT[np.rint((scaled + 1.0) * ((len(_LUT) - 1) / 2)).astype(np.intp)]
    rgb[~finite] = NAN_RGB
    return rgb


@lru_cache(maxsize=1)
def _font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled font (the bitmap one where Pillow lacks FreeType)."""
    return ImageFont.load_default(size=FONT_SIZE)


def _ink(text: str) -> bytes | None:
    """The pixels ``text`` draws in the default font (None: the font cannot encode it)."""
    image = Image.new("L", (4 * FONT_SIZE, 2 * FONT_SIZE))
    try:
        ImageDraw.Draw(image).text((0, 0), text, font=_font(), fill=255)
    except (UnicodeError, ValueError, OSError):
        return None
    return image.tobytes()


@lru_cache(maxsize=1)
def _missing_glyph() -> bytes | None:
    return _ink("\U0010fffd")  # a private-use code point: what a missing glyph looks like


@lru_cache(maxsize=4096)
def _renders(ch: str) -> bool:
    ink = _ink(ch)
    return ink is not None and any(ink) and ink != _missing_glyph()


@lru_cache(maxsize=4096)
def _glyph(ch: str) -> str:
    """``ch`` where the default font draws it, else a readable stand-in (accents dropped, "?")."""
    if ch.isspace():
        return " "
    if _renders(ch):
        return ch
    if ch in _FALLBACK:
        return _FALLBACK[ch]
    base = "".join(c for c in unicodedata.normalize("NFKD", ch) if not unicodedata.combining(c))
    if base and base != ch and all(_renders(c) for c in base):
        return base
    return "?"


def _drawable(text: str, limit: int | None = None) -> str:
    """``text`` in characters the default font draws, cut to ``limit`` characters."""
    text = "".join(_glyph(ch) for ch in str(text))
    if limit is not None and len(text) > limit:
        text = text[: limit - 1] + _glyph("\u2026")
    return text


@lru_cache(maxsize=4096)
def _width(text: str) -> int:
    return int(math.ceil(_font().getbbox(text)[2])) if text else 0


@lru_cache(maxsize=4096)
def _mask(text: str, upright: bool = True) -> Image.Image:
    """``text`` drawn once as a coverage mask (turned to read upwards where not ``upright``);
    token, step and layer labels repeat at every snapshot, so they are drawn once per run."""
    mask = Image.new("L", (max(1, _width(text)), max(1, math.ceil(_font().getbbox("Hg")[3]))))
    ImageDraw.Draw(mask).text((0, 0), text, font=_font(), fill=255)
    return mask if upright else mask.transpose(Image.Transpose.ROTATE_90)


def _stamp(image: Image.Image, xy: tuple[float, float], text: str, fill=TEXT_RGB,
           upright: bool = True) -> None:
    if text:
        image.paste(fill, (round(xy[0]), round(xy[1])), _mask(text, upright))


def _fit(text: str, width: int) -> str:
    """``text`` cut (ending in an ellipsis) to at most ``width`` pixels."""
    if _width(text) <= width:
        return text
    lo, hi = 0, len(text)
    while lo < hi:  # the longest prefix that fits with the ellipsis
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if _width(text[:mid] + _glyph("\u2026")) <= width else (lo, mid - 1)
    return text[:lo] + _glyph("\u2026")


def _heatmap_image(
    values: np.ndarray,
    tokens: Sequence[str],
    row_labels: Sequence[str],
    *,
    name: str,
    row_name: str,
    title: str,
    label: str,
    cues: Sequence[bool] | None,
) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or 0 in values.shape:
        raise ValueError(f"{name}: the scores must be a non-empty 2-D array (rows x tokens); "
                         f"got shape {values.shape}")
    rows, cols = values.shape
    if len(tokens) != cols:
        raise ValueError(f"{name}: {len(tokens)} tokens for {cols} score columns; pass one "
                         "token string per column")
    if len(row_labels) != rows:
        raise ValueError(f"{name}: {len(row_labels)} {row_name} labels for {rows} score rows; "
                         f"pass one {row_name} per row")
    if cues is not None and len(cues) != cols:
        raise ValueError(f"{name}: cues has {len(cues)} entries for {cols} tokens; pass one "
                         "bool per token (True marks a cue word)")
    font = _font()
    top, bottom = font.getbbox("Hg")[1], font.getbbox("Hg")[3]
    line = bottom + 3  # one line of text, in pixels
    mid = (top + bottom) / 2  # from a text's y to the middle of its ink

    # Cells: as wide/tall as fits ~640 x 320 pixels, labels on every k-th row/column.
    cw, ch = int(np.clip(640 // cols, 3, 28)), int(np.clip(320 // rows, 2, 20))
    every_col, every_row = math.ceil((bottom - top + 2) / cw), math.ceil(line / ch)
    bound = score_bound(values)
    cue = [bool(c) for c in cues] if cues is not None else [False] * cols
    texts = [_drawable(display_token(t, mathtext=False), MAX_LABEL_CHARS) for t in tokens]
    shown_cols = range(0, cols, every_col)
    shown_rows = range(0, rows, every_row)
    row_texts = {r: _drawable(row_labels[r], MAX_LABEL_CHARS) for r in shown_rows}
    left = PAD + max([_width(row_name)] + [_width(t) for t in row_texts.values()]) + 4
    grid_w, grid_h = cols * cw, rows * ch
    strip = max(_width(texts[c]) for c in shown_cols) + 4  # height of the rotated labels

    y_grid = PAD + (line if title else 0) + line
    y_cue = y_grid + grid_h + 1
    y_tokens = y_cue + (CUE_BAR + 1 if cues is not None and any(cue) else 0)
    y_legend = y_tokens + strip + 4
    lo_text, hi_text = f"-{bound:.3g}", f"+{bound:.3g}"
    legend_w = _width(lo_text) + 4 + LEGEND_BAR + 4 + _width(hi_text) + 10 + _width(label)
    notes = "; ".join(n for n, present in (
        ("green bar and label: cue word", any(cue)),
        ("grey: no score", not np.isfinite(values).all())) if present)
    body_w = max(left + grid_w, PAD + legend_w, PAD + _width(notes)) + PAD
    width = max(body_w, min(_width(title) + 2 * PAD, max(body_w, 720)))
    height = y_legend + line * (2 if notes else 1) + PAD

    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    cells = score_rgb(values, bound)
    canvas[y_grid:y_grid + grid_h, left:left + grid_w] = np.repeat(
        np.repeat(cells, ch, axis=0), cw, axis=1)
    for c in np.flatnonzero(cue):
        canvas[y_cue:y_cue + CUE_BAR, left + c * cw:left + (c + 1) * cw] = CUE_RGB
    bar_x = PAD + _width(lo_text) + 4
    bar_y = y_legend + int(mid) - 5
    canvas[bar_y:bar_y + 10, bar_x:bar_x + LEGEND_BAR] = _LUT[
        np.linspace(0, len(_LUT) - 1, LEGEND_BAR).round().astype(np.intp)]

    image = Image.fromarray(canvas)
    if title:
        _stamp(image, (PAD, PAD), _fit(_drawable(title), width - 2 * PAD))
    _stamp(image, (left - 4 - _width(row_name), y_grid - line), row_name)
    for r, text in row_texts.items():
        _stamp(image, (left - 4 - _width(text), y_grid + r * ch + ch / 2 - mid), text)
    # Token labels read upwards, their ends against the grid.
    for c in shown_cols:
        _stamp(image, (left + c * cw + cw / 2 - mid, y_tokens + 2), texts[c],
               CUE_RGB if cue[c] else TEXT_RGB, upright=False)
    _stamp(image, (PAD, y_legend), lo_text)
    _stamp(image, (bar_x + LEGEND_BAR + 4, y_legend), hi_text)
    _stamp(image, (bar_x + LEGEND_BAR + 4 + _width(hi_text) + 10, y_legend), label)
    _stamp(image, (PAD, y_legend + line), notes)
    return np.asarray(image)


def layer_heatmap(
    scores: np.ndarray,
    tokens: Sequence[str],
    layers: Sequence[int],
    *,
    title: str = "",
    label: str = "NormXLogit",
    cues: Sequence[bool] | None = None,
) -> np.ndarray:
    """Tokens x layers at one step, as an (H, W, 3) uint8 image. scores: [K, T] (NaN: grey).

    ``tokens``: the raw token strings (whitespace is made visible, long tokens are cut);
    ``cues``: one bool per token, cue words get a green bar and a green label.
    """
    return _heatmap_image(scores, tokens, [str(layer) for layer in layers], name="layer_heatmap",
                          row_name="layer", title=title, label=_drawable(label), cues=cues)


def history_heatmap(
    scores: np.ndarray,
    tokens: Sequence[str],
    steps: Sequence[int],
    *,
    title: str = "",
    label: str = "NormXLogit",
    cues: Sequence[bool] | None = None,
    per_step: bool = True,
) -> np.ndarray:
    """Tokens x snapshots: how importance emerged, as an (H, W, 3) uint8 image. scores: [S, T].

    ``per_step`` (default): each row is scaled to its own largest |score|, so early steps,
    whose scores are orders of magnitude smaller than late ones, stay readable; the legend
    says so. False: one zero-centred scale for all steps.
    """
    if per_step:
        scores, label = row_scaled(scores), f"{label}: {ROW_SCALE_LABEL}"
    return _heatmap_image(scores, tokens, [str(s) for s in steps], name="history_heatmap",
                          row_name="step", title=title, label=_drawable(label), cues=cues)

