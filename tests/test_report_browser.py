"""`normx report` opened in a real headless Chromium: sections, pictures, escaped tokens.

Needs a Chromium binary (`apt-get install -y chromium`); without one the test fails, it does
not skip. Set NORMX_SCREENSHOT_DIR to keep the screenshot for a look.
"""

from __future__ import annotations

import base64
import html
import io
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from normx_callbacks.report import SECTIONS, write_report

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
WINDOW = (1400, 7000)  # tall enough to reach the probes: heatmaps and token strips


def find_chromium() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("headless Chromium is needed for the report test and was not found: install it "
                "with `apt-get install -y chromium` (or put chromium on PATH)")


def chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    command = [find_chromium(), "--headless", "--no-sandbox", "--disable-gpu",
               "--disable-background-networking", "--no-first-run", "--hide-scrollbars",
               "--disable-dev-shm-usage", f"--user-data-dir={tmp / 'profile'}", *args]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


@pytest.fixture(scope="module")
def report(tiny_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "report.html"
    # The markup probe comes first in the run's probe list, so it is among the 3 shown.
    return write_report([tiny_run], out, max_probes=3)


@pytest.fixture(scope="module")
def rendered(report, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chromium")
    url = report.resolve().as_uri()
    dom = chromium(tmp, "--dump-dom", url).stdout
    shot = tmp / "report.png"
    chromium(tmp, f"--screenshot={shot}", f"--window-size={WINDOW[0]},{WINDOW[1]}", url)
    keep = os.environ.get("NORMX_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / "report.png")
    return dom, shot


class TokenSpans(HTMLParser):
    """Collects the text of each token strip and any element found inside a token span."""

    def __init__(self):
        super().__init__()
        self.depth = 0  # > 0 inside <div class="tokens">
        self.in_span = 0
        self.strips: list[str] = []
        self.nested: list[str] = []

    def handle_starttag(self, tag, attrs):
        if self.depth:
            self.depth += tag != "br"
            if self.in_span:
                self.nested.append(tag)
            if tag == "span" and "style" in dict(attrs):
                self.in_span += 1
        elif tag == "div" and "tokens" in (dict(attrs).get("class") or "").split():
            self.depth = 1
            self.strips.append("")

    def handle_endtag(self, tag):
        if self.depth:
            self.depth -= 1
            if tag == "span" and self.in_span:
                self.in_span -= 1

    def handle_data(self, data):
        if self.in_span:
            self.strips[-1] += data


def test_every_section_is_in_the_rendered_page(rendered):
    dom, _ = rendered
    for section in SECTIONS:
        assert re.search(rf'<section id="{section}">\s*<h2>', dom), section
    assert dom.count('class="probe"') == 3
    assert "<script" not in dom and "http://" not in dom and "https://" not in dom


def test_embedded_images_are_not_blank(rendered):
    dom, _ = rendered
    sources = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', dom)
    # loss, predictions, alignment, stability, norms, norm-frequency; 3 per probe
    assert len(sources) >= 6 + 3 * 3
    for data in sources:
        pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100
        assert pixels.std() > 0


def test_screenshot_shows_a_page(rendered):
    _, shot = rendered
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float64)
    assert pixels.shape[:2] == (WINDOW[1], WINDOW[0])
    assert pixels.std() > 5
    # Colour, not just text: the heatmaps and the token strips are drawn.
    saturation = pixels.max(axis=2) - pixels.min(axis=2)
    assert (saturation > 100).mean() > 0.005


def test_markup_in_tokens_shows_as_text(rendered):
    dom, _ = rendered
    assert "the &lt;b&gt;bold&lt;/b&gt; key near the cabinets" in dom
    parser = TokenSpans()
    parser.feed(dom)
    assert parser.strips, "no token strips in the page"
    assert parser.nested == [], f"elements inside token spans: {parser.nested}"
    assert any("<b>bold</b>" in strip for strip in parser.strips)


def test_notebook_api_returns_the_report_figures(tiny_run):
    from normx_callbacks import images, load_run, plots

    run = load_run(tiny_run)
    fig = plots.emergence_heatmap(run, "markup")
    heat, bar = fig.axes
    assert heat.get_ylabel() == "training step"
    assert [t.get_text() for t in heat.get_yticklabels()] == [str(s) for s in run.steps]
    assert "<" in [t.get_text() for t in heat.get_xticklabels()]
    assert bar.get_ylabel() == "NormXLogit: score / largest |score| of its step"
    low, high = bar.get_ylim()
    assert low == pytest.approx(-1.0) and high == pytest.approx(1.0)  # zero-centred, per step
    for make in (lambda: plots.alignment_curves(run), lambda: plots.norm_distribution(run),
                 lambda: plots.norm_frequency(run), lambda: plots.target_curve(run, "markup"),
                 lambda: plots.layer_view(run, "markup", step=8)):
        fig = make()
        assert fig.axes[0].get_xlabel() and fig.axes[0].get_ylabel()
    with pytest.raises(ValueError, match="probe_id='nope' is not in .*'markup'"):
        plots.emergence_heatmap(run, "nope")
    assert images.display_token("$x$\n") == "\\$x\\$\u21b5"
    assert images.display_token("$x$", mathtext=False) == "$x$"
    assert images.display_token(" ") == "' '"  # whitespace alone is shown quoted


def test_summary_paragraph_opens_the_page(rendered, tiny_run):
    from normx_callbacks import load_run
    from normx_callbacks.summary import summary_paragraph

    dom, _ = rendered
    expected = summary_paragraph(load_run(tiny_run))
    assert "Probe accuracy" in expected and "Cue AP" in expected
    found = re.search(r'<p class="summary">(.*?)</p>', dom, re.S)
    assert found and html.unescape(found.group(1)) == expected
    assert found.start() < dom.index('<section id="runs">')


def _spines(dark: np.ndarray, axis: int, share: float) -> list[int]:
    """Indices of pixel rows (axis=1) or columns (axis=0) that are mostly dark: axes frames."""
    counts = dark.sum(axis=axis)
    return [int(i) for i in np.flatnonzero(counts > share * dark.shape[axis])]


def test_emergence_heatmap_is_readable_at_every_step(rendered, tiny_run):
    from normx_callbacks import load_run

    dom, _ = rendered
    alt = "markup: NormXLogit per token over training"
    found = re.search(rf'<figure><img alt="{re.escape(alt)}" src="data:image/png;base64,'
                      r'([A-Za-z0-9+/=]+)"><figcaption>([^<]*)</figcaption>', dom)
    assert found, "no emergence heatmap of the markup probe"
    assert "scaled to its own largest |score|" in html.unescape(found.group(2))
    pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(found.group(1)))).convert("RGB"),
                        dtype=np.int64)
    dark = pixels.max(axis=2) < 80
    rows = _spines(dark, 1, 0.3)  # the heatmap's top and bottom frame lines
    top, bottom = rows[0], rows[-1]
    columns = _spines(dark[top:bottom + 1], 0, 0.8)  # its left and right frame (then the bar)
    left = columns[0]
    right = next(c for c in columns if c > left + 10)
    steps = load_run(tiny_run).steps
    saturation = pixels.max(axis=2) - pixels.min(axis=2)
    bands = np.linspace(top + 2, bottom - 2, len(steps) + 1).astype(int)
    for step, (y0, y1) in zip(steps, zip(bands[:-1], bands[1:], strict=True), strict=True):
        # Each step's strongest token reaches the end of the colour scale: not blank white.
        assert saturation[y0 + 1:y1 - 1, left + 2:right - 2].max() > 60, f"step {step} is blank"
