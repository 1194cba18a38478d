"""HTML and Markdown for people to read: escaping and page building in one place.

`normx report`, `normx attribute --html`, the W&B token heatmaps and the TensorBoard
Markdown tables all build their text here, so every string from a run (token, probe
text, path) is escaped by the same code. Pages need no network and run no script:
figures are base64 PNGs, styles are inline, and a Content-Security-Policy forbids
everything else.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

POSITIVE_RGB = "214,39,40"  # evidence for the prediction
NEGATIVE_RGB = "31,119,180"  # evidence against it

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0 auto;
 max-width:1500px;padding:0 24px 48px;color:#1d1d1f;background:#fff;line-height:1.45}
h1{margin:24px 0 4px}h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:36px}
h3{margin:24px 0 6px;font-family:ui-monospace,Menlo,Consolas,monospace}
nav a{margin-right:14px}.meta{color:#555;font-size:0.9em}
.note{color:#6a4d00;background:#fff7e0;border-left:4px solid #e0b000;padding:6px 10px}
table{border-collapse:collapse;font-size:0.88em;margin:8px 0}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f4f4f4}td.l,th.l{text-align:left}
.grid{display:grid;gap:16px;align-items:start}
figure{margin:6px 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:0.85em;color:#555}
.probe{border:1px solid #ddd;border-radius:6px;padding:4px 16px 12px;margin:18px 0}
.text{font-family:ui-monospace,Menlo,Consolas,monospace;background:#f6f6f6;padding:4px 8px;
 white-space:pre-wrap}
.tokens{font-size:1.05em;margin:6px 0}
.legend{display:inline-block;width:160px;height:12px;vertical-align:middle;border:1px solid #ccc;
 background:linear-gradient(to right,rgb(NEGATIVE),#fff,rgb(POSITIVE))}
.runlabel{font-weight:600;margin:8px 0 2px}
.summary{font-size:1.05em;background:#f3f7fb;border-left:4px solid #1f77b4;padding:8px 12px}
""".replace("NEGATIVE", NEGATIVE_RGB).replace("POSITIVE", POSITIVE_RGB)


def esc(value: object) -> str:
    """Text for HTML content or attributes."""
    return html.escape(str(value), quote=True)


def markdown_table(frame: pd.DataFrame, float_format: str = "{:.3f}") -> str:
    """A Markdown table; cell text is escaped so token strings render as text."""

    def cell(value) -> str:
        if isinstance(value, float):
            return float_format.format(value)
        text = esc(value).replace("|", "\\|").replace("\n", " ")
        return text.replace("*", "\\*").replace("_", "\\_").replace("`", "\\`")

    header = "| " + " | ".join(cell(c) for c in frame.columns) + " |"
    rule = "|" + "---|" * len(frame.columns)
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *rows])


def token_html(tokens: Sequence[str], scores: Sequence[float], *, title: str = "") -> str:
    """Tokens coloured by a zero-centred score (red positive, blue negative), escaped."""
    values = np.asarray(scores, dtype=np.float64)
    finite = values[np.isfinite(values)]
    bound = float(np.abs(finite).max()) if finite.size else 1.0
    bound = bound or 1.0
    spans = []
    for token, value in zip(tokens, values, strict=True):
        if not np.isfinite(value):
            colour, tip = "transparent", "n/a"
        else:
            a = min(abs(value) / bound, 1.0)
            rgb = POSITIVE_RGB if value >= 0 else NEGATIVE_RGB
            colour, tip = f"rgba({rgb},{a:.2f})", f"{value:.3f}"
        spans.append(
            f'<span title="{tip}" style="background:{colour};padding:1px 2px;'
            f'border-radius:2px;white-space:pre">{esc(token)}</span>'
        )
    head = f"<div><b>{esc(title)}</b></div>" if title else ""
    return f'<div style="font-family:monospace;line-height:1.9">{head}{"".join(spans)}</div>'


def figure_html(fig, alt: str, caption: str = "") -> str:
    """A matplotlib figure as an embedded PNG."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, facecolor="white")
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f'<figure><img alt="{esc(alt)}" src="data:image/png;base64,{data}">{cap}</figure>'


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def page(title: str, body: str) -> str:
    """A complete, self-contained HTML document (no network, no script)."""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "img-src data:; style-src 'unsafe-inline'\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{_CSS}</style></head>\n<body>\n{body}\n</body></html>\n"
    )


def token_legend() -> str:
    return ('<p class="meta">Token colours: <span class="legend"></span> blue = evidence '
            "against the prediction, white = 0, red = evidence for it; each strip is scaled to "
            "its own largest |score| (shown after it). Hover a token for its score.</p>")


def token_strip(tokens: Sequence[str], scores: Sequence[float]) -> str:
    """Escaped tokens coloured by a zero-centred score, with the scale printed after them."""
    finite = [abs(s) for s in scores if s is not None and math.isfinite(s)]
    bound = max(finite) if finite else float("nan")
    return (f'<div class="tokens">{token_html(list(tokens), list(scores))}'
            f'<span class="meta">scale: \u00b1{bound:.3g}</span></div>')


def html_table(frame: pd.DataFrame, left: Sequence[str] = ()) -> str:
    """An HTML table, every cell escaped; ``left``: the columns aligned left."""

    def cell(tag: str, col: str, value: object) -> str:
        cls = ' class="l"' if col in left else ""
        if isinstance(value, float):
            text = "-" if math.isnan(value) else f"{value:.3f}"
        else:
            text = str(value)
        return f"<{tag}{cls}>{esc(text)}</{tag}>"

    head = "".join(cell("th", c, c) for c in frame.columns)
    rows = "".join("<tr>" + "".join(cell("td", c, v) for c, v in zip(frame.columns, row,
                                                                       strict=True)) + "</tr>"
                   for row in frame.itertuples(index=False))
    return f"<table><tr>{head}</tr>{rows}</table>"


def grid(cells: Sequence[str]) -> str:
    """Cells side by side, equal widths."""
    n = max(1, len(cells))
    return (f'<div class="grid" style="grid-template-columns:repeat({n},minmax(0,1fr))">'
            + "".join(f"<div>{c}</div>" for c in cells) + "</div>")
