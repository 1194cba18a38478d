"""The matplotlib figures: drawn without pyplot, so importing or drawing never changes the
user's backend and no figure stays registered with pyplot."""

import numpy as np

from normx_callbacks import images, plots


def test_figures_are_not_registered_with_pyplot_and_render_to_png(tmp_path):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    scores = np.array([[0.5, -1.0, 2.0], [1.0, 0.0, -0.5]])
    labels = [images.display_token(t) for t in ["a", "$b$", "\n"]]
    fig = plots.layer_figure(scores, labels, [3, 4], title="probe at 8", cues=[False, True, False])
    assert plt.get_fignums() == before  # nothing to close, nothing leaks in a long notebook
    heat = fig.axes[0]
    assert heat.get_ylabel() == "layer"
    assert [t.get_text() for t in heat.get_xticklabels()] == labels
    # Zero-centred colours: the colour bar spans -|max| .. +|max| of the scores.
    low, high = fig.axes[1].get_ylim()
    assert low < 0 < high
    path = tmp_path / "f.png"
    fig.savefig(path, format="png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    curves = plots.metric_curves({"run": ([0, 10, 100], [0.1, 0.5, 0.9])}, title="t",
                                 bands={"run": ([0, 10, 100], [0.0, 0.4, 0.8], [0.2, 0.6, 1.0])})
    ax = curves.axes[0]
    assert [line.get_label() for line in ax.lines] == ["run"]
    assert len(ax.collections) == 1  # the band
    assert plt.get_fignums() == before
