"""NormXLogit against what users would pick instead: time per instance, peak memory and the
largest batch that fits a memory budget, on one model with one probe set.

    python benchmarks/compare.py --threads 1            # ~10 minutes on 2 shared CPU cores
    python benchmarks/compare.py --threads 1 --quick    # timing only, about a minute
    python benchmarks/compare.py --threads 1 --no-timing --budget-gib 4 --skip nx-fast nx-all naive
    python benchmarks/compare.py --device cuda --out compare-gpu.json   # GPT-2 small, 40 GiB
    python benchmarks/compare.py --quick --layers 1 --width 32 --vocab 256 --length 8 \
        --probes 2 --batch-size 2 --repeats 1                      # smallest, timing
    python benchmarks/compare.py --no-timing --search slope-only --layers 1 --width 32 \
        --vocab 256 --length 8 --probes 2 --batch-size 2 --skip nx-fast nx-all saliency \
        input_x_gradient integrated_gradients naive                # smallest, memory

The two smallest runs (tests/test_benchmarks.py) check the code paths; their numbers mean
nothing.

CPU default: a GPT-2 shape (4 layers, d=256, vocabulary 32000), 8 random probes of 256
tokens; `--device cuda` default: GPT-2 small (124M), 32 probes of 512 tokens, bfloat16,
budget 40 GiB (the paper's 48 GB GPU less the model and headroom). Every method explains
the model's argmax at the last position, through the package's public functions:
normxlogit (`attribute("normxlogit", ...)`, the pairing's baseline), nx-fast (targets
given, `probabilities=False`), nx-all (`layers="all"`), saliency, input_x_gradient and
integrated_gradients (Captum, n_steps=50; skipped with a note where Captum is missing),
naive (the all-layer lens with every logit materialised, 2 rows per micro-batch).

Time: every method runs between two normxlogit calls, in rotating order; its ratio is its
time over their mean (median over rounds); time per instance is the median call / N.
Memory: CPU, a fresh process per method builds the same model, imports Captum and makes one
warm-up call on one row, then measures VmHWM above the live RSS after a reset of the
high-water mark for the timed call and for one pass of B=1 and B=8 (IG: 1 and 2); CUDA,
`max_memory_allocated` above the allocation before the call, in process.
Largest batch: most instances in ONE pass under the budget (IG: B instances x n_steps
interpolated rows in one forward+backward). `--search slope`: a line through the two
one-pass sizes, then secant steps, each trial a fresh process, until known to 5%;
`bisect`: doubling then bisection to 5%; `slope-only`: the line's prediction, unverified.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import harness as h

from normx_callbacks import attribute, normxlogit, resolve_adapter

try:
    import captum.attr  # noqa: F401  (imported before any memory baseline)
    HAVE_CAPTUM = True
except ImportError:
    HAVE_CAPTUM = False
PAPER = {"integrated_gradients": (1.79 / 0.36, 750 / 2), "saliency": (None, 750 / 100),
         "input_x_gradient": (None, 750 / 100)}  # time and batch ratios, 48 GB GPU, T=512
METHODS = ("normxlogit", "nx-fast", "nx-all", "saliency", "input_x_gradient",
           "integrated_gradients", "naive")
GRADIENT = ("saliency", "input_x_gradient", "integrated_gradients")


def make_call(method, model, ids, mask, targets, S: dict, one_pass: bool = False):
    """A zero-argument call of `method` on (ids, mask): micro-batched as timed, or one pass."""
    bs = ids.shape[0] if one_pass else S["batch_size"]
    if method == "normxlogit":
        return lambda: attribute("normxlogit", model, ids, mask, batch_size=bs)
    if method == "nx-fast":
        return lambda: normxlogit(model, ids, mask, targets=targets, probabilities=False,
                                  batch_size=bs)
    if method == "nx-all":
        return lambda: normxlogit(model, ids, mask, layers="all", batch_size=bs)
    if method in GRADIENT:
        if method == "integrated_gradients" and one_pass:
            bs = ids.shape[0] * S["n_steps"]  # every interpolated row of every instance at once
        return lambda: attribute(method, model, ids, mask, batch_size=bs, n_steps=S["n_steps"])
    step = ids.shape[0] if one_pass else 2
    return lambda: [h.naive_lens(model, ids[i:i + step], mask[i:i + step])
                    for i in range(0, ids.shape[0], step)]


def setup(S: dict, rows: int, device: str, dtype: str):
    model = h.build(h.config(S["model"], S["vocab"], layers=S["layers"], width=S["width"]),
                    device, dtype)
    return (model, *h.inputs(model, rows, S["length"], device))


# --------------------------------------------------------------------------- memory


def peaks(method: str, specs: list, S: dict, device: str, dtype: str, cache: dict) -> list:
    """Peak bytes above the baseline for each [rows, one_pass], in this process."""
    need = max(r for r, _ in specs)
    if cache.get("rows", 0) < need:
        cache.clear()
        rows = max(need, 64) if device == "cuda" else need  # on the GPU, kept for the search
        cache.update(rows=rows, parts=setup(S, rows, device, dtype), warm=set())
        resolve_adapter(cache["parts"][0])
    model, ids, mask, targets = cache["parts"]
    if method not in cache["warm"]:  # lazy initialisation is not the method's memory
        cache["warm"].add(method)
        make_call(method, model, ids[:1], mask[:1], targets[:1], S, one_pass=True)()
    return [h.peak_of(make_call(method, model, ids[:r], mask[:r], targets[:r], S, one_pass),
                      device) for r, one_pass in specs]


def measure_memory(method: str, specs: list, S: dict, args, cache: dict) -> list:
    if args.device == "cuda":  # in process: the caching allocator's counters are exact
        return peaks(method, specs, S, "cuda", args.dtype, cache)
    cmd = [__file__, "--mem-child", method, "--specs", json.dumps(specs),
           "--settings", json.dumps(S), "--dtype", args.dtype]
    try:
        return h.run_child(cmd, args.threads)[0]
    except h.ChildFailed:  # killed for memory reads as "too big"
        return [math.inf] * len(specs)


def largest_batch(method: str, S: dict, args, cache: dict, known: dict) -> dict:
    budget = S["budget_gib"] * 2**30

    def peak(b: int) -> float:
        if b not in known:
            known[b] = measure_memory(method, [[b, True]], S, args, cache)[0]
            print(f"    {method:22s} B={b:<5d} peak {h.gib(known[b])}", flush=True)
        return known[b]

    if S["search"] == "bisect":
        lo, hi = 0, 1
        while hi <= S["max_batch"] and peak(hi) <= budget:
            lo, hi = hi, hi * 2
        while hi <= S["max_batch"] and hi - lo > max(1, lo // 20):
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if peak(mid) <= budget else (lo, mid)
        return {"batch": lo, "capped": hi > S["max_batch"], "trials": known}
    b2 = 2 if method == "integrated_gradients" else 8
    if peak(1) > budget:
        return {"batch": 0, "trials": known}
    first_fit = (peak(b2) - peak(1)) / (b2 - 1)
    if S["search"] == "slope-only":
        return {"batch": max(b2 + math.floor((budget - known[b2]) / max(first_fit, 1.0)), 0),
                "unverified": True, "trials": known}
    for _ in range(10):  # secant steps through the nearest measured sizes, each a fresh process
        fits = sorted(b for b, v in known.items() if v <= budget)
        over = sorted(b for b, v in known.items() if v > budget)
        lo, hi = fits[-1], (over[0] if over else None)
        if hi is not None and hi - lo <= max(1, lo // 20):
            break
        ref = hi if hi is not None else next((b for b in reversed(fits) if b < lo), None)
        slope = ((known[ref] - known[lo]) / (ref - lo) if ref is not None
                 and math.isfinite(known[ref]) else first_fit)
        guess = lo + int((budget - known[lo]) / max(slope, 1.0))
        if hi is None:  # aim 5% past the prediction so that an upper bound turns up
            guess = max(int(guess * 1.05), lo + 1)
        else:
            guess = min(max(guess, lo + 1), hi - 1)
            guess = (lo + hi) // 2 if guess in (lo + 1, hi - 1) and hi - lo > 2 else guess
        peak(guess)
    return {"batch": max(b for b, v in known.items() if v <= budget), "trials": known}


# --------------------------------------------------------------------------- main


def run(S: dict, args, methods: list) -> dict:
    res: dict = {}
    cache: dict = {}
    if not args.no_timing:
        model, ids, mask, targets = setup(S, S["probes"], args.device, args.dtype)
        calls = {m: make_call(m, model, ids, mask, targets, S) for m in methods}
        print(f"timing {', '.join(methods)} on {S['probes']} x {S['length']} tokens", flush=True)
        slow = {"integrated_gradients": S["slow_repeats"], "naive": S["slow_repeats"]}
        samples, ratios, _ = h.paired_rounds(calls, "normxlogit", S["repeats"], args.device,
                                             repeats_for=slow)
        res["s_per_instance"] = {m: h.median(samples[m]) / S["probes"] for m in methods}
        res["x_normxlogit"] = {"normxlogit": 1.0, **{m: h.median(r) for m, r in ratios.items()}}
        del model, calls
        h.free(args.device)
    if not args.no_memory:
        print("memory (CPU: a fresh process per method and per search trial; GPU: in process):")
        res["peak_timed_call"], res["largest_batch"] = {}, {}
        for m in methods:
            b2 = 2 if m == "integrated_gradients" else 8
            first = measure_memory(m, [[S["probes"], False], [1, True], [b2, True]], S, args,
                                   cache)
            res["peak_timed_call"][m] = first[0]
            print(f"    {m:22s} timed call peak {h.gib(first[0])}; one pass B=1 "
                  f"{h.gib(first[1])}, B={b2} {h.gib(first[2])}", flush=True)
            if m != "nx-all":  # nx-all: normxlogit's pattern plus (L+1)·B·T·d for the lens
                known = {} if S["search"] == "bisect" else {1: first[1], b2: first[2]}
                res["largest_batch"][m] = largest_batch(m, S, args, cache, known)
    return res


def report(S: dict, res: dict, methods: list) -> str:
    t, r = res.get("s_per_instance", {}), res.get("x_normxlogit", {})
    peak, batch = res.get("peak_timed_call", {}), res.get("largest_batch", {})
    nxb = batch.get("normxlogit", {}).get("batch")

    def b(m):
        return batch[m]["batch"] if m in batch else None
    return h.table(
        ["method", "s / instance", "x normxlogit (paired)", "peak, timed call",
         f"largest batch, 1 pass, {S['budget_gib']:g} GiB", "normxlogit batch / this"],
        [[m, f"{t[m]:.4f}" if m in t else "-", h.ratio(r.get(m)),
          h.gib(peak[m]) if m in peak else "-", "-" if b(m) is None else b(m),
          f"{nxb / b(m):.0f}" if b(m) and nxb else "-"] for m in methods])


def main(argv=None) -> int:
    p = h.parser(__doc__)
    for flag in ("layers", "width", "vocab", "length", "probes", "batch-size", "repeats"):
        p.add_argument(f"--{flag}", type=int)
    p.add_argument("--model", choices=tuple(h.SHAPES), help="default gpt2 (cuda: gpt2-124m)")
    p.add_argument("--budget-gib", type=float, help="default 1 (cuda: 40)")
    p.add_argument("--search", choices=("slope", "bisect", "slope-only"), default="slope")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--no-timing", action="store_true")
    p.add_argument("--skip", nargs="*", default=[], choices=METHODS)
    p.add_argument("--mem-child", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--specs", help=argparse.SUPPRESS)
    p.add_argument("--settings", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.mem_child:  # a fresh process: measure, print one JSON line
        h.set_threads(args.threads)
        print(json.dumps(peaks(args.mem_child, json.loads(args.specs),
                               json.loads(args.settings), "cpu", args.dtype, {})))
        return 0
    gpu, quick = args.device == "cuda", args.quick
    if quick and not args.no_timing:
        args.no_memory = True  # the memory search spawns processes: minutes, not seconds
    S = {"model": args.model or ("gpt2-124m" if gpu else "gpt2"),
         "vocab": args.vocab or (None if gpu else 32000), "layers": args.layers,
         "width": args.width, "length": args.length or (512 if gpu else 128 if quick else 256),
         "probes": args.probes or (32 if gpu else 4 if quick else 8),
         "batch_size": args.batch_size or (4 if quick else 8), "n_steps": 50,
         "repeats": args.repeats or (3 if quick else 5), "slow_repeats": 1 if quick else 3,
         "budget_gib": args.budget_gib or (40.0 if gpu else 1.0), "search": args.search,
         "max_batch": 4096}
    S = {k: v for k, v in S.items() if v is not None}
    S.setdefault("layers", h.SHAPES[S["model"]]["layers"])
    S.setdefault("width", h.SHAPES[S["model"]]["width"])
    methods = [m for m in METHODS if m not in args.skip
               and (HAVE_CAPTUM or m not in GRADIENT)]
    info = h.start(args, "NormXLogit vs gradient methods and the naive lens", S)
    if not HAVE_CAPTUM:
        print("captum is not installed: the gradient methods are skipped")
    started = time.perf_counter()
    res = run(S, args, methods)
    print()
    print(report(S, res, methods))
    r, b = res.get("x_normxlogit", {}), res.get("largest_batch", {})
    print("\nheadline (this run | paper, 48 GB GPU, length 512):")
    for m in (m for m in GRADIENT if m in methods):
        line = f"  {m:22s}"
        if m in r:
            line += f" time / normxlogit {r[m]:7.1f}x"
            line += f" | paper {PAPER[m][0]:.1f}x" if PAPER[m][0] else ""
        if m in b and "normxlogit" in b:
            got = (f"{b['normxlogit']['batch'] / b[m]['batch']:.0f}x" if b[m]["batch"]
                   else "- (not one instance fits)")
            line += f";  batch normxlogit / this {got} | paper {PAPER[m][1]:.1f}x"
        print(line)
    h.finish(args, started, machine=info, settings=S, results=res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
