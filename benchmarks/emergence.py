"""What issue #23's extra measurements cost: the training thread, with and without them, in one
process, and the gradient reference of alignment per snapshot.

    python benchmarks/emergence.py                 # tiny.yaml's model and probes, 1 thread
    python benchmarks/emergence.py --quick         # fewer rounds (a check)
    python benchmarks/emergence.py --smoke --cache-dir /tmp/tok   # smallest: the code path only

`--smoke` (tests/test_benchmarks.py) runs every measurement once on the smallest inputs: 400
training sentences, 4 probes, 4 batches counted and folded, 2 rounds; its numbers mean
nothing. `--cache-dir` is where the BPE tokenizer is cached (default .normx_cache, as in
tiny.yaml).

The model is configs/tiny.yaml's (2-layer GPT-2 shape, d_model 64, the agreement corpus's
BPE vocabulary, 64 held-out probes, batches of 32 x 32 tokens), freshly initialised.
Timings are paired (`harness.paired_rounds`: each arm between two runs of its baseline, the
order rotating per round), so a slow stretch of this shared machine moves both.

Training thread, per snapshot:
- the probe forward as the engine runs it (`normxlogit(..., layers="all")`) without and with
  `prediction_depth=True` (the logit lens over the full vocabulary at the explained position
  of every layer);

per training step:
- counting a batch's tokens only (`TokenCounter.batch_counts`, the work before #23) against
  `TokenCounter.update` (tokens and next-token pair keys, on the batch's device);

per snapshot, folding what was counted (100 steps' batches): the dense counts only against
`collect()` with the pairs (a `torch.unique` over the pending keys and the merge).

Helper process (or training thread when faithfulness runs there), per faithfulness snapshot:
the gradient reference of alignment, `methods.probe_attributions` over the 64 probes, for
each gradient method (Integrated Gradients needs Captum), and the snapshot
builder's work (`SnapshotBuilder.build`, metrics, intervals, tables) with the gradient
scores and pair counts.
"""

from __future__ import annotations

import time

import harness as h
import torch

from normx_callbacks import normxlogit
from normx_callbacks.demo import LanguageModel, TextDataModule
from normx_callbacks.discovery import resolve_adapter
from normx_callbacks.embeddings import TokenCounter, embedding_norms
from normx_callbacks.engine import Engine
from normx_callbacks.methods import captum_installed, probe_attributions
from normx_callbacks.settings import Settings
from normx_callbacks.snapshot import Snapshot, SnapshotBuilder

STEPS_PER_SNAPSHOT = 100  # tiny.yaml's every_n_steps


def main(argv=None) -> int:
    p = h.parser(__doc__, devices=False)
    p.add_argument("--rounds", type=int, help="timing rounds (default 40, quick 10, smoke 2)")
    p.add_argument("--smoke", action="store_true", help="the smallest run (see above)")
    p.add_argument("--cache-dir", default=".normx_cache", help="tokenizer cache")
    args = p.parse_args(argv)
    args.threads = args.threads or 1
    rounds = args.rounds or (2 if args.smoke else 10 if args.quick else 40)
    steps = 4 if args.smoke else STEPS_PER_SNAPSHOT  # batches counted, then folded
    probes = 4 if args.smoke else 64
    info = h.start(args, "the cost of #23's measurements", {
        "rounds": rounds, "threads": args.threads, "smoke": args.smoke})
    h.set_threads(args.threads)
    started = time.perf_counter()
    dm = TextDataModule(corpus="agreement", bpe_vocab_size=512, batch_size=32, context=32,
                        num_train=400 if args.smoke else 20000, num_probes=probes, seed=0,
                        cache_dir=args.cache_dir)
    dm.setup("fit")
    torch.manual_seed(0)
    module = LanguageModel(arch="gpt2", d_model=64, n_layers=2, n_heads=4, context=32,
                           dropout=0.0, vocab_size=dm.vocab_size, pad_token_id=dm.pad_token_id,
                           tokenizer=dm.tokenizer)
    adapter = resolve_adapter(module.model)
    engine = Engine(dm.probes, Settings(media_probes=0))
    engine.prepare(adapter, dm.tokenizer, is_writer=False)
    enc = engine.ctx.encoded
    batches = [b for _, b in zip(range(steps), dm.train_dataloader(), strict=False)]

    def forward(depth: bool):
        return lambda: normxlogit(adapter, enc.input_ids, enc.attention_mask,
                                  positions=enc.positions, targets=enc.targets,
                                  foils=enc.foils, layers="all", batch_size=32,
                                  prediction_depth=depth)

    counter = TokenCounter(dm.vocab_size)
    state = {"i": 0}

    def next_batch():
        state["i"] = (state["i"] + 1) % len(batches)
        return batches[state["i"]]

    def count_tokens_only():
        counts = counter.batch_counts(next_batch())
        counter.pending = counts if counter.pending is None else counter.pending + counts

    def count_with_pairs():
        counter.update(next_batch())

    def fill(pairs: bool) -> TokenCounter:
        c = TokenCounter(dm.vocab_size)
        for batch in batches:
            if pairs:
                c.update(batch)
            else:
                c.pending = c.batch_counts(batch) + (0 if c.pending is None else c.pending)
        return c

    print("\nTraining thread (median over rounds; ratio: with / without, paired):")
    rows = []
    for name, without, with_ in (
            ("probe forward per snapshot", forward(False), forward(True)),
            ("counting per training step", count_tokens_only, count_with_pairs)):
        samples, ratios, _ = h.paired_rounds({"without": without, "with": with_}, "without",
                                             rounds, "cpu")
        rows.append((name, f"{1e3 * h.median(samples['without']):.3f}",
                     f"{1e3 * h.median(samples['with']):.3f}",
                     f"{h.median(ratios['with']):.3f}"))
    # Folding at a snapshot: each timed call needs a fresh counter holding 100 steps' batches.
    fold = {True: [], False: []}
    for _ in range(max(3, rounds // 4)):
        for pairs in (False, True):
            c = fill(pairs)
            fold[pairs].append(h.timed(c.collect, "cpu"))
    rows.append((f"folding {len(batches)} steps' counts per snapshot",
                 f"{1e3 * h.median(fold[False]):.3f}", f"{1e3 * h.median(fold[True]):.3f}",
                 f"{h.median(fold[True]) / h.median(fold[False]):.3f}"))
    print(h.table(("work", "without ms", "with ms", "ratio"), rows))
    per_snapshot_without = float(rows[0][1]) + STEPS_PER_SNAPSHOT * float(rows[1][1]) + float(
        rows[2][1])
    per_snapshot_with = float(rows[0][2]) + STEPS_PER_SNAPSHOT * float(rows[1][2]) + float(
        rows[2][2])
    print(f"\nPer snapshot interval of {STEPS_PER_SNAPSHOT} steps (forward + counting + fold): "
          f"{per_snapshot_without:.1f} ms without, {per_snapshot_with:.1f} ms with "
          f"(+{per_snapshot_with - per_snapshot_without:.1f} ms, ratio "
          f"{per_snapshot_with / per_snapshot_without:.3f}).")

    methods = ("input_x_gradient", "saliency",
               *(("integrated_gradients",) if captum_installed() else ()))
    seconds: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(max(2, rounds // 10)):
        for method, (_, s) in probe_attributions(adapter, enc, methods,
                                                 batch_size=32).items():
            seconds[method].append(s)
    print(f"\nGradient reference of alignment, per faithfulness snapshot ({probes} probes, "
          f"{args.threads} thread(s)):")
    print(h.table(("method", "seconds (median)"),
                  [(m, f"{h.median(v):.3f}") for m, v in seconds.items()]))

    builder = SnapshotBuilder(engine.ctx)
    counted = fill(True)
    counted.collect()
    attribution = forward(True)()
    gradient = probe_attributions(adapter, enc, methods, batch_size=32)
    norms = embedding_norms(adapter.embedding.weight)
    build = []
    for i in range(max(3, rounds // 8)):
        snap = Snapshot(step=i, final=False, attribution=attribution, norms=norms,
                        counts=counted.counts.clone(), pairs=counted.pairs(),
                        gradient=gradient)
        build.append(h.timed(lambda snap=snap: builder.build(snap), "cpu"))
    print(f"\nSnapshot builder (helper), with the gradient scores and pair counts: "
          f"{h.median(build):.3f} s per snapshot (median of {len(build)}).")
    h.finish(args, started, machine=info, rows=rows,
             interval_ms={"without": per_snapshot_without, "with": per_snapshot_with},
             gradient_seconds={m: h.median(v) for m, v in seconds.items()},
             build_seconds=h.median(build))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
