"""`pages`: the HTML and Markdown every report, W&B heatmap and TensorBoard table is built
from.

Checks that every string from a run is escaped (HTML content and attributes, Markdown
emphasis and table pipes), the colours and scale of a token strip (red for, blue against,
each strip scaled to its own largest |score|, NaN left uncoloured), that `figure_html`
embeds a PNG that decodes to the figure's size, and that `page` builds a self-contained
document whose Content-Security-Policy forbids everything but inline styles and data
images. (test_report_browser.py renders a whole report in Chromium.)
"""

from __future__ import annotations

import base64
import io
import math
import re

import pandas as pd
import pytest
from matplotlib.figure import Figure  # no pyplot: the backend stays the user's, as in plots.py
from PIL import Image

from normx_callbacks.pages import (
    NEGATIVE_RGB,
    POSITIVE_RGB,
    esc,
    figure_html,
    grid,
    html_table,
    markdown_table,
    note,
    page,
    token_html,
    token_legend,
    token_strip,
)

MARKUP = "<script>alert('x')</script> & \"q\""


def test_esc_escapes_content_and_attribute_characters():
    assert esc(MARKUP) == ("&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; "
                           "&quot;q&quot;")
    assert esc(3.5) == "3.5" and esc(None) == "None"
    assert note("a < b") == '<p class="note">a &lt; b</p>'


def test_markdown_table_escapes_cells_and_formats_floats():
    frame = pd.DataFrame({"token": ["a|b", "*bold*", "_x_\nnext", "`code`"],
                          "score": [0.12345, -1.0, float("nan"), 2.0],
                          "count": [1, 2, 3, 4]})
    lines = markdown_table(frame).splitlines()
    assert lines[0] == "| token | score | count |"
    assert lines[1] == "|---|---|---|"
    assert lines[2:] == ["| a\\|b | 0.123 | 1 |", "| \\*bold\\* | -1.000 | 2 |",
                         "| \\_x\\_ next | nan | 3 |", "| \\`code\\` | 2.000 | 4 |"]
    assert markdown_table(pd.DataFrame({"v": [0.5]}), "{:.1f}").splitlines()[2] == "| 0.5 |"
    assert markdown_table(pd.DataFrame({"<b>": ["<i>"]})).splitlines()[::2] == [
        "| &lt;b&gt; |", "| &lt;i&gt; |"]


def _spans(html: str) -> list[tuple[str, str, str]]:
    """(title, background, text) of each token span."""
    return re.findall(r'<span title="([^"]*)" style="background:([^;]*);[^"]*">([^<]*)</span>',
                      html)


def test_token_html_colours_by_a_zero_centred_score_scaled_to_the_largest():
    html = token_html(["the", "<key>", "is", "pad"], [2.0, -1.0, 0.0, float("nan")],
                      title="probe <1>")
    assert _spans(html) == [
        ("2.000", f"rgba({POSITIVE_RGB},1.00)", "the"),
        ("-1.000", f"rgba({NEGATIVE_RGB},0.50)", "&lt;key&gt;"),
        ("0.000", f"rgba({POSITIVE_RGB},0.00)", "is"),
        ("n/a", "transparent", "pad"),
    ]
    assert "<b>probe &lt;1&gt;</b>" in html and "<key>" not in html
    # All NaN (or all zero): no division by zero, nothing coloured.
    assert [s[1] for s in _spans(token_html(["a", "b"], [float("nan"), 0.0]))] == [
        "transparent", f"rgba({POSITIVE_RGB},0.00)"]
    with pytest.raises(ValueError):  # a score per token, or the page would misalign them
        token_html(["a", "b"], [1.0])


def test_token_strip_prints_its_own_scale_and_the_legend_explains_the_colours():
    strip = token_strip(["a", "b"], [0.25, -4.0])
    assert strip.startswith('<div class="tokens"><div style=')
    assert strip.endswith('<span class="meta">scale: \u00b14</span></div>')
    assert len(_spans(strip)) == 2
    assert "scale: \u00b1nan" in token_strip(["a"], [float("nan")])
    legend = token_legend()
    assert '<span class="legend"></span>' in legend
    assert "blue = evidence against" in legend and "red = evidence for" in legend


def test_figure_html_embeds_a_png_of_the_figure_with_escaped_alt_and_caption():
    fig = Figure(figsize=(3, 2))
    fig.subplots().plot([0, 1], [1, 0])
    html = figure_html(fig, alt='a "quoted" <alt>', caption="x < y")
    match = re.fullmatch(r'<figure><img alt="([^"]*)" src="data:image/png;base64,([A-Za-z0-9+/=]+)'
                         r'"><figcaption>([^<]*)</figcaption></figure>', html)
    assert match is not None
    alt, data, caption = match.groups()
    assert alt == "a &quot;quoted&quot; &lt;alt&gt;" and caption == "x &lt; y"
    png = base64.b64decode(data, validate=True)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    image = Image.open(io.BytesIO(png))
    image.verify()
    assert image.size == (300, 200)  # dpi 100
    assert "<figcaption>" not in figure_html(Figure(), alt="no caption")


def test_html_table_escapes_cells_shows_nan_as_a_dash_and_aligns_named_columns_left():
    frame = pd.DataFrame({"probe": ["<b>x</b>"], "p": [0.98765], "low": [math.nan], "n": [3]})
    assert html_table(frame, left=("probe",)) == (
        '<table><tr><th class="l">probe</th><th>p</th><th>low</th><th>n</th></tr>'
        '<tr><td class="l">&lt;b&gt;x&lt;/b&gt;</td><td>0.988</td><td>-</td><td>3</td></tr>'
        "</table>")


def test_grid_puts_cells_side_by_side_in_equal_columns():
    assert grid(["<p>a</p>", "<p>b</p>"]) == (
        '<div class="grid" style="grid-template-columns:repeat(2,minmax(0,1fr))">'
        "<div><p>a</p></div><div><p>b</p></div></div>")
    assert "repeat(1," in grid([])


def test_page_is_a_self_contained_document_that_runs_no_script():
    html = page("run <1>", "<p>body</p>")
    assert html.startswith("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">")
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]*)"', html).group(1)
    assert csp == "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
    assert "<title>run &lt;1&gt;</title>" in html
    assert "<body>\n<p>body</p>\n</body></html>\n" in html
    assert "<script" not in html and "http://" not in html and "https://" not in html
