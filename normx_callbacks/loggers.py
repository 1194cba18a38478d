"""The one seam between snapshots and experiment loggers.

Scalars go to every attached logger through `log_metrics`: Lightning and Fabric loggers,
and for a transformers `Trainer` the two sinks below (`TensorBoardDirLogger`: a
TensorBoard writer of our own in the directory the Trainer's TensorBoard callback writes
to; `WandbRunLogger`: the Trainer's own active W&B run). Rich media
dispatch on the logger type here and nowhere else: TensorBoard gets histograms,
images and Markdown tables (it strips HTML); W&B gets histograms, images, a
long-format `wandb.Table` and `wandb.Html` token heatmaps, all media of one snapshot in
one `run.log` call, with `normx/*` defined to step on the host's step metric
(`trainer/global_step` for Lightning, `train/global_step` for the transformers Trainer; so
W&B's media slider follows training steps, not its internal `_step`); any other logger gets
the scalars and one warning naming what it cannot show. A logger that raises is
warned about once and skipped from then on for what raised (scalars or media, separately:
a broken image writer does not cost the scalar curves); the store is unaffected.

Past 400 lines as one module: it is the one seam to every logger kind, with what a snapshot
shows; splitting by logger would spread the media rules.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import numpy as np
import pandas as pd
from lightning.fabric.loggers import Logger, TensorBoardLogger  # Trainer's loggers subclass these
from lightning.pytorch.loggers import WandbLogger

from . import images

# Both live in `pages` (one escaping code for every page); imported from here too.
from .pages import markdown_table
from .pages import token_html as token_html

log = logging.getLogger(__name__)


# TensorBoard's Custom Scalars tab: each metric next to what it must be read against.
# Tags are regular expressions (TensorBoard matches them against every scalar tag).
TENSORBOARD_LAYOUT = {
    "normx: cue words": {
        "AP: NormXLogit, LogAt and random": ["Multiline", [r"^normx/alignment/ap(_random|_logat)?$"]],
        "AP controls: first snapshot, target - foil score, gradient references": [
            "Multiline", [r"^normx/alignment/ap(_reference|_contrast|_contrast_random)?$",
                          r"^normx/alignment/[a-z_]+/ap$"]],
        "paired differences over probes (0 = none): vs random, vs first snapshot": [
            "Multiline", [r"^normx/alignment/.*_vs_(random|reference)$",
                          r"^normx/alignment/[a-z_]+/normxlogit_minus_method$"]],
        "cue over attractor, random and first snapshot": [
            "Multiline", [r"^normx/alignment/cue_over_attractor(_random|_reference)?$"]],
        "DP: standardised (dp_z), paper's (dp_raw) and random": [
            "Multiline", [r"^normx/alignment/dp_(z|raw|random)$"]],
        "AP per layer": ["Multiline", [r"^normx/alignment/ap_layer\d+$"]],
    },
    "normx: predictions": {
        "probe accuracy and target probability": [
            "Multiline", [r"^normx/probe/(accuracy|target_prob)$"]],
        "target - foil logit": ["Multiline", [r"^normx/probe/contrast$"]],
        "prediction depth: first layer whose logit lens ranks the target first": [
            "Multiline", [r"^normx/probe/prediction_depth$"]],
    },
    "normx: embedding norms": {
        "norm distribution": ["Multiline", [r"^normx/embedding/(mean|median|p05|p95|min|max)$"]],
        "tracked tokens": ["Multiline", [r"^normx/embedding/track/"]],
        "Spearman(norm, information gain) (paper: > 0), (norm, log frequency) (paper: < 0)": [
            "Multiline", [r"^normx/embedding/norm_(infogain|logfreq)_spearman$"]],
        "Spearman(norm, LogAt) over probe tokens": [
            "Multiline", [r"^normx/importance/norm_logat_spearman$"]],
        "median norm: seen and never-seen tokens": [
            "Multiline", [r"^normx/embedding/(seen|unseen)_norm_median$"]],
    },
    "normx: stability and faithfulness": {
        "rank stability vs previous snapshot": ["Multiline", [r"^normx/stability/spearman$"]],
        "comprehensiveness (AOPC)": ["Multiline", [r"^normx/faithfulness/.*/comprehensiveness$"]],
        "sufficiency (AOPC)": ["Multiline", [r"^normx/faithfulness/.*/sufficiency$"]],
    },
}


def norm_extremes(norms: np.ndarray, counts: np.ndarray, k: int, text_of) -> tuple[pd.DataFrame,
                                                                              pd.DataFrame]:
    """The ``k`` largest and smallest embedding norms, tokens seen in training apart.

    Returns (seen, never_seen): ``seen`` lists tokens counted in training with their count,
    ``never_seen`` the extremes among tokens training has not shown yet (their rows move by
    weight decay and shared gradients only, so they crowd the extremes of the full list).
    ``text_of``: token ids -> readable token text (decoded; the piece where decoding is lossy).
    """
    norms = np.asarray(norms, dtype=np.float64)
    counts = np.asarray(counts)
    finite = np.isfinite(norms)
    frames = []
    for chosen in (finite & (counts > 0), finite & (counts == 0)):
        ids = np.flatnonzero(chosen)
        order = ids[np.argsort(norms[ids], kind="stable")]
        top, bottom = order[::-1][:k], order[:k]
        rows = [("top", rank, int(i)) for rank, i in enumerate(top)]
        rows += [("bottom", rank, int(i)) for rank, i in enumerate(bottom)]
        texts = text_of([i for _, _, i in rows]) if rows else []
        frames.append(pd.DataFrame(
            {"list": [r[0] for r in rows], "rank": [r[1] for r in rows],
             "token": texts, "token_id": [r[2] for r in rows],
             "count": [int(counts[r[2]]) for r in rows],
             "norm": [float(norms[r[2]]) for r in rows]},
            columns=["list", "rank", "token", "token_id", "count", "norm"]))
    return frames[0], frames[1].drop(columns="count")


def tensorboard_suffix(run_id: str) -> str:
    """The end of the name of a `TensorBoardDirLogger`'s event file for run ``run_id``: how
    the report finds the TensorBoard runs (and the host's loss curves in them) of a store."""
    return f".normx-{run_id}"


class TensorBoardDirLogger:
    """TensorBoard in a given directory, for hosts without a Lightning logger (the
    transformers Trainer): a `SummaryWriter` of its own, created at the first write, so
    our event file sits beside the host's in one TensorBoard run. `LoggerSink` treats it as
    a `TensorBoardLogger`. ``run_id``, when set before the first write, ends the event
    file's name (`tensorboard_suffix`)."""

    name = "tensorboard"
    version = None

    def __init__(self, log_dir: str | os.PathLike) -> None:
        self.log_dir = str(log_dir)
        self.run_id: str | None = None
        self._writer = None

    @property
    def experiment(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            # Flushed every 10 s (not 120): the curves show while the Trainer runs.
            self._writer = SummaryWriter(
                log_dir=self.log_dir, flush_secs=10,
                filename_suffix=tensorboard_suffix(self.run_id) if self.run_id else "")
        return self._writer

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        writer = self.experiment
        for key, value in metrics.items():
            writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class WandbRunLogger:
    """A W&B run that someone else started (the transformers Trainer's `WandbCallback`),
    logged into with its step metric. ``run`` defaults to the active run (`wandb.run`) at
    each call; `LoggerSink` treats it as a `WandbLogger`."""

    name = "wandb"

    def __init__(self, run=None, *, step_metric: str = "train/global_step") -> None:
        self._run = run
        self.step_metric = step_metric
        self._defined: set[int] = set()  # runs whose normx/* step metric is defined

    @property
    def experiment(self):
        if self._run is not None:
            return self._run
        import wandb

        if wandb.run is None:
            raise RuntimeError("no W&B run is active (report_to includes 'wandb', but "
                               "wandb.init has not run)")
        return wandb.run

    @property
    def version(self) -> str | None:
        """The run id (recorded in the store's run.json)."""
        try:
            return self.experiment.id
        except (ImportError, RuntimeError):
            return None

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        run = self.experiment
        if id(run) not in self._defined:
            self._defined.add(id(run))
            run.define_metric(f"{PREFIX}/*", step_metric=self.step_metric)
        run.log({**metrics, self.step_metric: step})




def _tensorboard(logger) -> bool:
    return isinstance(logger, (TensorBoardLogger, TensorBoardDirLogger))


def _wandb(logger) -> bool:
    return isinstance(logger, (WandbLogger, WandbRunLogger))


class LoggerSink:
    """Routes one snapshot's outputs to the trainer's loggers (call on rank 0 only)."""

    def __init__(self, loggers: Sequence[Logger], *, owner: str = "normx_callbacks"):
        self.loggers = list(loggers)
        self.owner = owner  # who logs: the driver's name in every warning
        self._warned: set[tuple[int, str]] = set()
        self._broken: set[tuple[int, str]] = set()  # (id(logger), "scalars" | "media")
        self._pending: dict[int, dict] | None = None  # id(W&B logger) -> media of this snapshot
        self._defined: set[int] = set()  # W&B runs whose normx/* step metric is defined
        self._laid_out: set[int] = set()  # TensorBoard writers given the custom-scalars layout

    @contextmanager
    def snapshot(self, step: int) -> Iterator[None]:
        """Collect one snapshot's W&B media and send them in one `run.log` call at the end."""
        self._pending = {}
        for logger in self.loggers:
            if _tensorboard(logger) and id(logger) not in self._laid_out:
                self._laid_out.add(id(logger))
                self._guard(logger, "the custom-scalars layout",
                            lambda lg=logger: lg.experiment.add_custom_scalars(TENSORBOARD_LAYOUT))
        try:
            yield
        finally:
            pending, self._pending = self._pending, None
            for logger in self.loggers:
                payload = pending.get(id(logger))
                if payload:
                    self._guard(logger, "media",
                                lambda lg=logger, p=payload: self._wandb_log(lg, p, step))

    def _wandb_log(self, logger, payload: dict, step: int) -> None:
        run = logger.experiment
        step_metric = getattr(logger, "step_metric", "trainer/global_step")
        if id(run) not in self._defined:
            self._defined.add(id(run))
            run.define_metric(step_metric)
            run.define_metric(f"{PREFIX}/*", step_metric=step_metric)
        run.log({**payload, step_metric: step})

    def _warn_once(self, logger: Logger, what: str, message: str) -> None:
        key = (id(logger), what)
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)

    def _guard(self, logger: Logger, what: str, fn, kind: str = "media") -> None:
        key = (id(logger), kind)
        if key in self._broken:
            return
        try:
            fn()
        except Exception as error:  # a logger must never take the training run down
            self._broken.add(key)
            log.warning(
                "%s: %s raised while logging %s (%s: %s); %s for this "
                "logger are skipped from now on, the snapshot store keeps everything",
                self.owner, type(logger).__name__, what, type(error).__name__, error, kind,
            )

    def scalars(self, metrics: Mapping[str, float], step: int) -> None:
        clean = {k: float(v) for k, v in metrics.items()}
        for logger in self.loggers:
            self._guard(logger, "scalars", lambda lg=logger: lg.log_metrics(clean, step=step),
                        kind="scalars")

    def _media(self, what: str, step: int, *, tensorboard=None, wandb=None) -> None:
        """``wandb``: a zero-argument callable building the W&B media object for ``what``."""
        for logger in self.loggers:
            if _tensorboard(logger) and tensorboard is not None:
                self._guard(logger, what, lambda lg=logger: tensorboard(lg.experiment))
            elif _wandb(logger) and wandb is not None:
                if self._pending is not None:  # inside snapshot(): sent once at its end
                    self._guard(logger, what, lambda lg=logger: self._pending.setdefault(
                        id(lg), {}).__setitem__(what, wandb()))
                else:
                    self._guard(logger, what, lambda lg=logger: self._wandb_log(
                        lg, {what: wandb()}, step))
            elif not (_tensorboard(logger) or _wandb(logger)):
                self._warn_once(
                    logger, "media",
                    f"{self.owner}: {type(logger).__name__} receives scalars only; "
                    "histograms, heatmaps and token tables go to TensorBoard/W&B and the "
                    "snapshot store (normx report reads the store)",
                )

    def histogram(self, tag: str, values: np.ndarray, step: int) -> None:
        values = np.asarray(values)
        values = values[np.isfinite(values)]
        if values.size == 0:
            return

        def wb():
            import wandb

            return wandb.Histogram(values)

        self._media(tag, step, tensorboard=lambda w: w.add_histogram(tag, values, step), wandb=wb)

    @property
    def takes_images(self) -> bool:
        """Whether any logger (not yet given up on) shows images."""
        return any((_tensorboard(lg) or _wandb(lg))
                   and (id(lg), "media") not in self._broken for lg in self.loggers)

    def figure(self, tag: str, image, step: int, *, png: bytes | None = None) -> None:
        """Log an image: an (H, W, 3) uint8 array, or a zero-argument callable returning one
        (`images.layer_heatmap` / `images.history_heatmap` draw them).

        Pass the callable: the image is then drawn only when some logger shows images.
        TensorBoard: `add_image` (HWC), or the image's ``png`` encoding when given (encoded
        where the image was drawn, e.g. the snapshot helper process); W&B: `wandb.Image`.
        """
        if callable(image):
            if not self.takes_images:
                self._media(tag, step)  # the one warning for loggers without media
                return
            image = image()
        image = self._checked_image(tag, image)

        def wb():
            import wandb

            return wandb.Image(image)

        def tensorboard(writer) -> None:
            if png is None or not hasattr(writer, "_get_file_writer"):
                writer.add_image(tag, image, step, dataformats="HWC")
                return
            from tensorboard.compat.proto.summary_pb2 import Summary

            encoded = Summary.Image(height=image.shape[0], width=image.shape[1], colorspace=3,
                                    encoded_image_string=png)
            writer._get_file_writer().add_summary(
                Summary(value=[Summary.Value(tag=tag, image=encoded)]), step)

        self._media(tag, step, wandb=wb, tensorboard=tensorboard)

    @staticmethod
    def _checked_image(tag: str, image) -> np.ndarray:
        array = image if isinstance(image, np.ndarray) else None
        if array is None or array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
            what = (f"an array of shape {array.shape} and dtype {array.dtype}"
                    if array is not None else f"a {type(image).__name__}")
            raise TypeError(
                f"LoggerSink.figure({tag!r}): expected an (H, W, 3) uint8 image array, got "
                f"{what}; draw it with normx_callbacks.images.layer_heatmap/history_heatmap, or "
                "convert a matplotlib figure with np.asarray(fig.canvas.buffer_rgba())[..., :3] "
                "after fig.canvas.draw()")
        return array

    def table(self, tag: str, frame: pd.DataFrame, step: int) -> None:
        """TensorBoard: a Markdown table. W&B: a long-format wandb.Table."""

        def wb():
            import wandb

            return wandb.Table(dataframe=frame)

        self._media(tag, step, tensorboard=lambda w: w.add_text(tag, markdown_table(frame), step),
                    wandb=wb)

    def html(self, tag: str, page: str, step: int) -> None:
        """W&B only: TensorBoard strips HTML, so it gets images and tables instead."""

        def wb():
            import wandb

            return wandb.Html(page, inject=False)

        self._media(tag, step, tensorboard=lambda w: None, wandb=wb)


PREFIX = "normx"


class SnapshotMedia:
    """What each snapshot shows in the loggers, built where the snapshot is built (the
    writer, possibly in the helper process): scalars, the norm histogram and extremes, and for
    the first ``media_probes`` probes the layer and history heatmaps (drawn only when some
    logger shows images), the token table and (W&B) the coloured tokens. Keeps the score
    history the history heatmaps draw (the last ``history_length`` snapshots)."""

    def __init__(self, ctx, *, media_probes: int, history_length: int,
                 takes_images: bool) -> None:
        self.ctx = ctx
        self.media_probes = media_probes
        self.takes_images = takes_images
        self.history: deque = deque(maxlen=history_length)

    def payload(self, step: int, built, attr, counts) -> list[tuple]:
        """``(kind, tag, data)`` items for `SnapshotLogger.send`."""
        ctx = self.ctx
        norms = built.embed.norms.numpy()
        items: list[tuple] = [
            ("scalars", None, {f"{PREFIX}/{k}": v for k, v in built.metrics.items()}),
            ("histogram", f"{PREFIX}/embedding/norms", norms)]
        seen, never_seen = norm_extremes(norms, counts.numpy(), ctx.top_k, ctx.text_of)
        items.append(("table", f"{PREFIX}/embedding/top", seen))  # seen in training, counts
        items.append(("table", f"{PREFIX}/embedding/top_never_seen", never_seen))
        enc = ctx.encoded
        self.history.append((step, attr.scores[: self.media_probes].numpy()))
        tokens_table = built.tables["tokens"]
        last_layer = tokens_table[tokens_table.layer == tokens_table.layer.max()]
        draw = self.takes_images
        for b in range(min(self.media_probes, len(enc))):
            probe_id = enc.ids[b]
            n = int(enc.attention_mask[b].sum())
            tokens = ctx.tokens[b][:n]
            cues = enc.cue_mask[b, :n].tolist()
            if attr.layer_scores is not None:
                items.append(("figure", f"{PREFIX}/heatmap/{probe_id}/layers", draw and _png(
                    images.layer_heatmap(attr.layer_scores[b, :, :n].numpy(), tokens,
                                        attr.layers, title=f"{probe_id} at step {step}",
                                        cues=cues))))
            steps = [s for s, _ in self.history]
            history = np.stack([scores[b, :n] for _, scores in self.history])
            items.append(("figure", f"{PREFIX}/heatmap/{probe_id}/history", draw and _png(
                images.history_heatmap(history, tokens, steps, cues=cues,
                                      title=f"{probe_id}: NormXLogit over training"))))
            rows = last_layer[last_layer.probe_id == probe_id]
            items.append(("table", f"{PREFIX}/tokens/{probe_id}",
                          rows[["position", "token", "is_cue", "norm", "logat", "score"]]))
            items.append(("html", f"{PREFIX}/html/{probe_id}",
                          token_html(tokens, attr.scores[b, :n].tolist(),
                                     title=f"{probe_id} step {step}")))
        return items


def _png(image: np.ndarray) -> tuple[np.ndarray, bytes]:
    """The image and its PNG encoding (what TensorBoard stores), made where it is drawn."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return image, buffer.getvalue()


class SnapshotLogger:
    """Sends `SnapshotMedia` payloads to the loggers (in the process the loggers live in);
    W&B gets each snapshot's media in one log call."""

    def __init__(self, loggers: Sequence[Logger], *, owner: str) -> None:
        self.sink = LoggerSink(loggers, owner=owner)

    @property
    def takes_images(self) -> bool:
        return self.sink.takes_images

    def send(self, step: int, items: list[tuple]) -> None:
        sink = self.sink
        with sink.snapshot(step):
            for kind, tag, data in items:
                if kind == "scalars":
                    sink.scalars(data, step)
                elif kind == "histogram":
                    sink.histogram(tag, data, step)
                elif kind == "table":
                    sink.table(tag, data, step)
                elif kind == "figure":  # (image, its PNG) or False when not drawn
                    image, png = data or (None, None)
                    sink.figure(tag, lambda image=image: image, step, png=png)
                elif kind == "html":
                    sink.html(tag, data, step)
