"""How NormXLogit's cost scales: with sequence length, vocabulary size, depth and the number
of probes, always against the forward-pass floor measured alongside.

    python benchmarks/scaling.py --threads 1          # ~4 minutes on 2 shared CPU cores
    python benchmarks/scaling.py --threads 1 --quick  # under a minute: fewer, smaller points
    python benchmarks/scaling.py --device cuda --out scaling-gpu.json   # GPT-2-small body
    python benchmarks/scaling.py --quick --width 32 --layers 1 --lengths 8 --vocabs 256 \
        --depths 1 --probes 2 --tokens-per-call 16 --repeats 1     # smallest: one point each

The smallest run (tests/test_benchmarks.py) checks the code path; its numbers mean nothing.

GPT-2 shapes with random weights. Each sweep varies one thing from a base point (CPU: 4
layers, d=256, vocabulary 32000, B=4 x T=256): length (64 .. 2048 at a constant 2048 tokens
per call, B = 2048 / T), vocab (8k .. 256k), depth (2 .. 16 layers) and probes (16 .. 512
probes of 64 tokens in micro-batches of 32, the floor micro-batched alike). `--device cuda`
default: the GPT-2-small body (12 layers, d=768), vocab (32000, 128256, 256000) and length
(128, 512, 2048 at 16384 tokens per call) sweeps, bfloat16.

Methods at each point, interleaved round by round with the floor (ratios: median of time /
mean of the floor calls just before and after): floor (`base_model(...,
output_hidden_states=True)`), nx (`normxlogit` defaults: argmax target, softmax over V at
the B rows), nx-fast (targets given, `probabilities=False`), nx-all (`layers="all"`),
nx-all-fast (both).
"""

from __future__ import annotations

import time

import harness as h

from normx_callbacks import normxlogit

SWEEPS = ("length", "vocab", "depth", "probes")
METHODS = {"length": ("nx", "nx-all"), "vocab": ("nx", "nx-fast", "nx-all", "nx-all-fast"),
           "depth": ("nx", "nx-all"), "probes": ("nx", "nx-all")}


def calls(model, ids, mask, targets, bs: int, methods) -> dict:
    fast = {"targets": targets, "probabilities": False}
    table = {
        "floor": h.body_floor(model, ids, mask, bs),
        "nx": lambda: normxlogit(model, ids, mask, batch_size=bs),
        "nx-fast": lambda: normxlogit(model, ids, mask, batch_size=bs, **fast),
        "nx-all": lambda: normxlogit(model, ids, mask, layers="all", batch_size=bs),
        "nx-all-fast": lambda: normxlogit(model, ids, mask, layers="all", batch_size=bs, **fast),
    }
    return {m: table[m] for m in ("floor", *methods)}


def point(sweep: str, value: int, *, layers: int, width: int, vocab: int, batch: int,
          length: int, args, batch_size: int | None = None, repeats: int) -> dict:
    model = h.build(h.config("gpt2", vocab, layers=layers, width=width), args.device, args.dtype)
    ids, mask, targets = h.inputs(model, batch, length, args.device)
    fns = calls(model, ids, mask, targets, batch_size or batch, METHODS[sweep])
    samples, ratios, _ = h.paired_rounds(fns, "floor", repeats, args.device)
    tokens = batch * length
    row = {"sweep": sweep, "value": value, "layers": layers, "width": width, "vocab": vocab,
           "batch": batch, "length": length,
           "ms": {m: 1e3 * h.median(s) for m, s in samples.items()},
           "us_per_token": {m: 1e6 * h.median(s) / tokens for m, s in samples.items()},
           "ratio": {m: h.median(r) for m, r in ratios.items()}}
    del model, fns
    h.free(args.device)
    shown = "  ".join(f"{m} {row['ratio'][m]:.2f}x" for m in METHODS[sweep])
    print(f"  {sweep:6s} {value:>7d}: floor {row['ms']['floor']:8.1f} ms "
          f"({row['us_per_token']['floor']:.1f} us/token)  {shown}", flush=True)
    return row


def run(args) -> list[dict]:
    base = {"layers": args.layers, "width": args.width, "vocab": 32000,
            "batch": max(args.tokens_per_call // 512, 1) if args.device == "cuda" else 4,
            "length": 512 if args.device == "cuda" else 128 if args.quick else 256}
    kw = {"args": args, "repeats": args.repeats}
    rows = []
    for sweep in args.sweeps:
        for v in getattr(args, sweep):
            if sweep == "length":
                at = {"batch": max(args.tokens_per_call // v, 1), "length": v}
            elif sweep == "probes":
                at = {"batch": v, "length": 64, "batch_size": 32,
                      "repeats": min(args.repeats, 2 if args.quick else 3)}
            else:
                at = {"vocab" if sweep == "vocab" else "layers": v}
            rows.append(point(sweep, v, **{**base, **kw, **at}))
    return rows


def tables(rows: list[dict]) -> str:
    out = []
    for sweep in SWEEPS:
        sub = [r for r in rows if r["sweep"] == sweep]
        if sub:
            ms = list(sub[0]["ratio"])
            out += [f"\n{sweep}:\n", h.table(
                [sweep, "B x T", "floor ms", "floor us/token", *(f"{m} / floor" for m in ms),
                 *(f"{m} us/token" for m in ms)],
                [[r["value"], f"{r['batch']} x {r['length']}", f"{r['ms']['floor']:.1f}",
                  f"{r['us_per_token']['floor']:.1f}", *(h.ratio(r["ratio"][m]) for m in ms),
                  *(f"{r['us_per_token'][m]:.1f}" for m in ms)] for r in sub])]
    return "\n".join(out)


def main(argv=None) -> int:
    p = h.parser(__doc__)
    p.add_argument("--sweeps", nargs="+", choices=SWEEPS)
    p.add_argument("--width", type=int, help="model width (default 256; cuda 768)")
    p.add_argument("--layers", type=int, help="base depth (default 4; cuda 12)")
    p.add_argument("--lengths", dest="length", type=int, nargs="+")
    p.add_argument("--vocabs", dest="vocab", type=int, nargs="+")
    p.add_argument("--depths", dest="depth", type=int, nargs="+")
    p.add_argument("--probes", type=int, nargs="+")
    p.add_argument("--tokens-per-call", type=int, help="length sweep (default 2048; cuda 16384)")
    p.add_argument("--repeats", type=int, help="timed rounds (default 5, quick 3)")
    args = p.parse_args(argv)
    gpu, quick = args.device == "cuda", args.quick
    args.sweeps = args.sweeps or (["length", "vocab"] if gpu else list(SWEEPS))
    args.width = args.width or (768 if gpu else 256)
    args.layers = args.layers or (12 if gpu else 4)
    args.tokens_per_call = args.tokens_per_call or (16384 if gpu else 512 if quick else 2048)
    args.length = args.length or ([128, 512, 2048] if gpu else [64, 256] if quick
                                  else [64, 128, 256, 512, 1024, 2048])
    args.vocab = args.vocab or ([32000, 128256, 256000] if gpu else [8192, 128256] if quick
                                else [8192, 32000, 128256, 256000])
    args.depth = args.depth or ([2, 8] if quick else [2, 4, 8, 16])
    args.probes = args.probes or ([16, 64] if quick else [16, 64, 128, 256, 512])
    args.repeats = args.repeats or (3 if quick else 5)
    settings = {k: getattr(args, k) for k in ("sweeps", "width", "layers", "tokens_per_call",
                                              "length", "vocab", "depth", "probes", "repeats")}
    info = h.start(args, "NormXLogit scaling (length, vocabulary, depth, probes)", settings)
    started = time.perf_counter()
    rows = run(args)
    print("\nRatios: median of time / mean of the adjacent floor calls. us/token: median call "
          "time / (B*T).")
    print(tables(rows))
    h.finish(args, started, machine=info, settings=settings, rows=rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
