"""How close NormXLogit comes to the cost of one forward pass of the transformer body.

    python benchmarks/floor.py --threads 1            # ~5 minutes on 2 CPU cores
    python benchmarks/floor.py --threads 1 --quick    # under a minute: T=64/128, 3 rounds
    python benchmarks/floor.py --device cuda --out floor-gpu.json   # GPT-2 small, Llama-1B
    python benchmarks/floor.py --quick --vocabs 256 --lengths 8 --repeats 1   # smallest

The smallest run (tests/test_benchmarks.py) checks the code path; its numbers mean nothing.

CPU default: a Llama shape (untied head, GQA, RMSNorm) and a GPT-2 shape (tied head,
LayerNorm), both 4 layers of width 256, at vocabularies 8192 and 128256, B=4 rows of
T=64/256/512 tokens in one pass. `--device cuda` default: GPT-2 small and a Llama-3.2-1B
shape at their own vocabularies, 256 probes of 512 tokens in micro-batches of 32,
bfloat16. Random weights; nothing is downloaded.

Methods, all on the same inputs: floor (`model.base_model(..., output_hidden_states=True)`,
no_grad), predict (`model(..., logits_to_keep=1)`, the model's own prediction), nx-last
(`normxlogit(model, ids, mask)`), nx-all (`layers="all"`), nx-fast / nx-all-fast (the same
with the argmax targets given and `probabilities=False`), the parts of nx-all (hooked body
forward, the head on the B explained rows, the lens; one pass only) and naive (NormXLogit
without row selection, all (L+1, B, T, V) logits materialised; skipped above
`--naive-max-gib`). Every call sits between two floor calls; the tables give the median of
time / mean of those two floors. Goal: nx-all <= 1.15x the floor, flat in vocabulary.
"""

from __future__ import annotations

import time

import harness as h
import torch

from normx_callbacks import normxlogit, resolve_adapter

GOAL = 1.15
MAIN = ("predict", "nx-last", "nx-all", "nx-fast", "nx-all-fast")
PARTS = ("part:body", "part:head", "part:lens")


def methods(model, ids, mask, targets, bs: int | None, naive: bool) -> dict:
    adapter = resolve_adapter(model)  # resolution is a one-time cost, kept out
    step = bs or ids.shape[0]
    chunks = [(ids[i:i + step], mask[i:i + step]) for i in range(0, ids.shape[0], step)]

    def predict():
        with torch.no_grad():
            for i, m in chunks:
                model(input_ids=i, attention_mask=m, logits_to_keep=1, use_cache=False)

    fast = {"targets": targets, "probabilities": False}
    fns = {
        "floor": h.body_floor(model, ids, mask, bs),
        "predict": predict,
        "nx-last": lambda: normxlogit(model, ids, mask, batch_size=bs),
        "nx-all": lambda: normxlogit(model, ids, mask, layers="all", batch_size=bs),
        "nx-fast": lambda: normxlogit(model, ids, mask, batch_size=bs, **fast),
        "nx-all-fast": lambda: normxlogit(model, ids, mask, layers="all", batch_size=bs, **fast),
    }
    if bs is None:  # nx-all taken apart with the adapter's public pieces (one pass)
        rows = torch.arange(ids.shape[0], device=ids.device)
        box: list = []

        def body():
            with torch.no_grad():
                box[:] = [adapter.hidden_states(ids, mask)]

        def head():
            with torch.no_grad():
                full = adapter.full_logits(box[0][-1][rows, -1])  # (B, V)
                box.append(full.argmax(-1))
                full.softmax(-1)[rows, box[-1]]

        def lens():
            with torch.no_grad():
                states, t = box[0], box[-1]
                logat = adapter.target_logits(
                    torch.stack([adapter.final_norm(s) for s in states[:-1]] + [states[-1]]), t)
                return torch.stack([s.float().norm(dim=-1) for s in states]) * logat

        fns.update({"part:body": body, "part:head": head, "part:lens": lens})
    if naive:
        fns["naive"] = lambda: [h.naive_lens(model, i, m) for i, m in chunks]
    return fns


def measure(shape: str, vocab: int | None, length: int, args) -> dict:
    model = h.build(h.config(shape, vocab), args.device, args.dtype)
    vocab = model.config.vocab_size
    ids, mask, targets = h.inputs(model, args.batch, length, args.device)
    itemsize = torch.finfo(getattr(torch, args.dtype)).bits // 8
    naive_bytes = ((model.config.num_hidden_layers + 1) * (args.batch_size or args.batch)
                   * length * vocab * itemsize)
    naive = naive_bytes <= args.naive_max_gib * 2**30
    fns = methods(model, ids, mask, targets, args.batch_size, naive)
    samples, ratios, jitter = h.paired_rounds(
        fns, "floor", args.repeats, args.device, warmup=1 if args.quick else 2,
        repeats_for={"naive": 1 if args.quick else 2},
        together=tuple(m for m in PARTS if m in fns))
    row = {"model": shape, "vocab": vocab, "batch": args.batch, "length": length,
           "ms": {m: 1e3 * h.median(s) for m, s in samples.items()},
           "ratio": {m: h.median(r) for m, r in ratios.items()},
           "naive_bytes": naive_bytes, "floor_jitter": h.median(jitter)}
    row["ratio"]["nx-all min/min"] = min(samples["nx-all"]) / min(samples["floor"])
    row["ratio"]["nx-all/predict"] = h.median(
        a / p for a, p in zip(ratios["nx-all"], ratios["predict"], strict=True))
    del model, fns
    h.free(args.device)
    print(f"  {shape:9s} V={vocab:<6d} T={length:<4d} floor {row['ms']['floor']:8.1f} ms  "
          f"nx-all {row['ratio']['nx-all']:.2f}x  nx-all-fast {row['ratio']['nx-all-fast']:.2f}x",
          flush=True)
    return row


def tables(rows: list[dict]) -> str:
    cols = ("nx-last", "nx-all", "nx-all min/min", "predict", "nx-all/predict", "nx-fast",
            "nx-all-fast", "naive")
    main = h.table(
        ["model", "vocab", "B x T", "floor ms", *cols, "naive ms", "naive logits",
         "floor jitter"],
        [[r["model"], r["vocab"], f"{r['batch']} x {r['length']}", f"{r['ms']['floor']:.1f}",
          *(h.ratio(r["ratio"].get(c)) if c != "naive" or "naive" in r["ratio"] else "skipped"
            for c in cols),
          f"{r['ms']['naive']:.0f}" if "naive" in r["ms"] else "-", h.gib(r["naive_bytes"]),
          f"{100 * r['floor_jitter']:.0f}%"] for r in rows])
    with_parts = [r for r in rows if "part:body" in r["ratio"]]
    if not with_parts:
        return main
    parts = h.table(
        ["model", "vocab", "B x T", "nx-all", "body (hooked)", "head on B rows",
         "lens, L+1 layers", "other", "head on B rows ms"],
        [[r["model"], r["vocab"], f"{r['batch']} x {r['length']}", h.ratio(r["ratio"]["nx-all"]),
          *(h.ratio(r["ratio"][p]) for p in PARTS),
          f"{r['ratio']['nx-all'] - sum(r['ratio'][p] for p in PARTS):+.2f}",
          f"{r['ms']['part:head']:.1f}"] for r in with_parts])
    return (f"{main}\n\nWhere nx-all's time goes (units of the floor, paired like the "
            f"ratios; other = nx-all - the three parts):\n\n{parts}")


def main(argv=None) -> int:
    p = h.parser(__doc__)
    p.add_argument("--models", nargs="+", choices=tuple(h.SHAPES),
                   help="default: gpt2 llama (cpu), gpt2-124m llama-1b (cuda)")
    p.add_argument("--vocabs", type=int, nargs="+",
                   help="for the toy shapes (default 8192 128256)")
    p.add_argument("--lengths", type=int, nargs="+")
    p.add_argument("--batch", type=int, help="rows per call (default 4; cuda 256)")
    p.add_argument("--batch-size", type=int,
                   help="micro-batch of every method (default: one pass; cuda 32)")
    p.add_argument("--repeats", type=int, help="timed rounds (default 11, quick 3)")
    p.add_argument("--naive-max-gib", type=float, help="skip the naive lens above this")
    args = p.parse_args(argv)
    gpu = args.device == "cuda"
    args.models = args.models or (["gpt2-124m", "llama-1b"] if gpu else ["llama", "gpt2"])
    args.vocabs = args.vocabs or [8192, 128256]
    args.lengths = args.lengths or ([512] if gpu else [64, 128] if args.quick
                                    else [64, 256, 512])
    args.batch = args.batch or (256 if gpu else 4)
    args.batch_size = args.batch_size or (32 if gpu else None)
    args.repeats = args.repeats or (3 if args.quick else 11)
    args.naive_max_gib = args.naive_max_gib or (8.0 if gpu else 0.2 if args.quick else 2.5)
    settings = {k: getattr(args, k) for k in ("models", "vocabs", "lengths", "batch",
                                              "batch_size", "repeats", "naive_max_gib")}
    info = h.start(args, "NormXLogit floor ratio", settings)
    started = time.perf_counter()
    rows = [measure(shape, vocab, length, args)
            for shape in args.models
            for vocab in ([None] if "vocab" in h.SHAPES[shape] else args.vocabs)
            for length in args.lengths]
    print("\nRatios to the floor (median over rounds of time / mean of the floor calls just "
          "before and after; floor ms and naive ms are medians):\n")
    print(tables(rows))
    worst = max(r["ratio"]["nx-all"] for r in rows)
    worst_fast = max(r["ratio"]["nx-all-fast"] for r in rows)
    print(f"\nnx-all / floor: worst {worst:.2f}; nx-all-fast (targets given, "
          f"probabilities=False): worst {worst_fast:.2f} (goal <= {GOAL:.2f})")
    h.finish(args, started, machine=info, settings=settings, goal=GOAL, rows=rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
