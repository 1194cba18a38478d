"""The dashboards' Pillow heatmaps: shape, the zero-centred colour rule, per-step scaling, cue
marks, missing scores and odd tokens, read back pixel by pixel."""

import numpy as np
import pytest

from normx_callbacks import images


def _columns(image: np.ndarray, colour) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns of the heatmap cells that have exactly ``colour``: runs of at least 3
    pixels (the legend's colour bar gives each colour a pixel at most)."""
    exact = (image == np.asarray(colour, dtype=np.uint8)).all(axis=2)
    runs = exact[:, :-2] & exact[:, 1:-1] & exact[:, 2:]
    ys, xs = np.nonzero(runs)
    return np.unique(ys), np.unique(np.concatenate([xs, xs + 1, xs + 2]))


BLUE, RED = (tuple(int(v) for v in c) for c in images.score_rgb(np.array([-1.0, 1.0])))


def test_heatmap_image_shape_colours_and_row_labels():
    rng = np.random.default_rng(0)
    tokens = [" the", " keys", " to", " the", " cabinet", " are"] * 2
    layers = images.layer_heatmap(rng.normal(size=(3, 12)), tokens, [0, 1, 2], title="p at 4")
    history = images.history_heatmap(rng.normal(size=(14, 12)), tokens, list(range(14)))
    for image in (layers, history):
        assert isinstance(image, np.ndarray) and image.dtype == np.uint8
        assert image.ndim == 3 and image.shape[2] == 3
    assert history.shape[0] > layers.shape[0]  # 14 rows are taller than 3
    # Zero-centred: the largest |score| is full red or full blue, a zero score the centre.
    assert images.score_rgb(np.array([0.0]))[0].tolist() == [247, 247, 247]
    assert RED[0] > RED[2] and BLUE[2] > BLUE[0]
    values = np.array([[2.0, -1.0, 0.5]])
    image = images.layer_heatmap(values, ["a", "b", "c"], [5])
    assert _columns(image, RED)[1].size and not _columns(image, BLUE)[1].size  # -1 of +-2


def test_history_rows_are_scaled_per_step_unless_asked_not_to():
    values = np.array([[0.001, -0.002], [10.0, 5.0]])  # step 0 is 5000x smaller than step 8
    scaled = images.history_heatmap(values, ["a", "b"], [0, 8])
    shared = images.history_heatmap(values, ["a", "b"], [0, 8], per_step=False)
    assert _columns(scaled, BLUE)[1].size and _columns(scaled, RED)[1].size
    assert not _columns(shared, BLUE)[1].size and _columns(shared, RED)[1].size


def test_cue_column_is_marked_and_missing_score_is_grey():
    values = np.array([[1.0, 0.0, -1.0], [1.0, np.nan, -1.0]])
    image = images.layer_heatmap(values, ["a", "cue", "c"], [0, 1], cues=[False, True, False])
    red_rows, red_x = _columns(image, RED)
    blue_rows, blue_x = _columns(image, BLUE)
    middle = np.arange(red_x.max() + 1, blue_x.min())  # the cue token's column
    assert middle.size > 2
    grid_bottom = red_rows.max()
    below = image[grid_bottom + 1:]
    cue = (below == images.CUE_RGB).all(axis=2)
    assert cue[:, middle].any()
    assert not cue[:, red_x].any() and not cue[:, blue_x].any()
    # Row 1's middle cell has no score: grey, where row 0's zero is the white centre.
    x = int(middle.mean())
    rows = red_rows[red_rows <= grid_bottom]
    top_half, bottom_half = rows[: rows.size // 2], rows[rows.size // 2:]
    assert image[int(top_half.mean()), x].tolist() == [247, 247, 247]
    assert image[int(bottom_half.mean()), x].tolist() == list(images.NAN_RGB)
    unmarked = images.layer_heatmap(values, ["a", "cue", "c"], [0, 1])
    assert not (unmarked == images.CUE_RGB).all(axis=2).any()


def test_one_token_one_row_long_and_odd_tokens_render():
    one = images.history_heatmap(np.array([[0.3]]), ["x"], [0], title="one snapshot")
    assert one.ndim == 3 and _columns(one, RED)[1].size  # row-scaled: 0.3 is its own maximum
    long = "supercalifragilistic" * 10
    cut = images.layer_heatmap(np.array([[1.0, -1.0]]), [long, "b"], [0])
    # Long tokens are cut to the same label, so the image does not grow with them.
    assert np.array_equal(cut, images.layer_heatmap(np.array([[1.0, -1.0]]), [long[:40], "b"],
                                                   [0]))
    assert cut.shape[0] < 250 and cut.shape[1] < 800
    odd = images.layer_heatmap(np.array([[1.0, -0.5, 0.2, 0.1]]), ["\n", " ", "caf\u00e9", "$x$"],
                              [0], title="a title " * 40)
    assert odd.shape[1] <= 800  # the long title is cut, not the image widened without bound


def test_heatmap_inputs_that_do_not_fit_say_which():
    with pytest.raises(ValueError, match="2 tokens for 3 score columns"):
        images.layer_heatmap(np.zeros((1, 3)), ["a", "b"], [0])
    with pytest.raises(ValueError, match="cues has 1 entries for 2 tokens"):
        images.history_heatmap(np.zeros((1, 2)), ["a", "b"], [0], cues=[True])
    with pytest.raises(ValueError, match="1 step labels for 2 score rows"):
        images.history_heatmap(np.zeros((2, 2)), ["a", "b"], [0])
