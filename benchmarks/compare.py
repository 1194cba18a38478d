"""NormXLogit against what users would pick instead: time per instance, peak memory and the
largest batch that fits a memory budget, on one model with one probe set.

    python benchmarks/compare.py --threads 1            # ~10 minutes on 2 shared CPU cores
    python benchmarks/compare.py --threads 1 --quick    # ~3 minutes
    python benchmarks/compare.py --device cuda --dtype bfloat16 --budget-gib 20 --out r.json

The model is a GPT-2 shape with random weights (default 4 layers, d=256, vocabulary 32000;
nothing is downloaded); the probes are N random sequences of T tokens (same seed for
every method), and every method explains the model's argmax at the last position.

Methods (all through the package's public functions):

- normxlogit:      `attribute("normxlogit", ..., batch_size=bs)` (last layer);
- nx-fast:         `normxlogit(..., targets=argmax, probabilities=False)`: the same scores
                   with targets given, reading only the target rows of the unembedding;
- nx-all:          `normxlogit(..., layers="all")`: the logit lens at all L+1 layers;
- saliency, input_x_gradient, integrated_gradients: `attribute(method, ..., n_steps=50,
                   batch_size=bs)`, Captum at the input-embedding output;
- naive:           NormXLogit at all L+1 layers without row selection: the full forward with
                   full-vocabulary logits everywhere, final norm + lm_head on every hidden
                   state, the (L+1, rows, T, V) logits materialised, then the target column
                   gathered (micro-batches of 2 rows, `Settings.naive_rows`).

Time: every method runs between two normxlogit calls, in rotating order; its ratio to
normxlogit is its time over the mean of those two (median over rounds). Time per instance
is the median call time over N.

Memory, CPU: each method gets its own fresh subprocess that builds the same model from the
same seed, imports everything (Captum too) and makes one warm-up call on one row. Then, for
each measurement, it records the resident set after `gc.collect()` + `malloc_trim(0)`,
resets the high-water mark (/proc/self/clear_refs) and reports peak RSS minus that baseline
(VmHWM). The first measurement is the timed call itself (N probes, micro-batched as timed),
for which `ru_maxrss` of the process minus the baseline is reported as a cross-check; then
one-pass calls at B=1 and B=8 (IG: 1 and 2) for the slope below. GPU:
`torch.cuda.max_memory_allocated()` minus the allocation before the call, in process.

Largest batch: the most instances one call processes in ONE pass under the budget (nx: one
forward of B rows; saliency/IxG: one forward+backward of B rows; IG: B instances x n_steps
interpolated rows in one forward+backward, `internal_batch_size = B * n_steps`, the way the
paper's batch sizes read; naive: B rows). `--search slope` (default) fits peak = a + b*B
through the two one-pass sizes above, then runs the predicted B in a fresh process and steps
down by 5% (each step a fresh process) until it fits; `--search bisect` doubles from 1 until
over budget and bisects to 5%, every trial in a fresh process; `--search slope-only`
reports the prediction of the slope through B=1 and B=8 (IG: 1 and 2), unverified.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    build,
    gib,
    gpt2_config,
    hwm,
    live_rss,
    machine,
    maxrss,
    median,
    paired_rounds,
    print_header,
    random_inputs,
    reset_peak,
    set_threads,
    warn_if_busy,
)

from normx_callbacks import attribute, normxlogit, resolve_adapter  # noqa: E402

PAPER = {"time_s": {"normxlogit": 0.36, "integrated_gradients": 1.79},
         "batch": {"normxlogit": 750, "integrated_gradients": 2, "saliency": 100,
                   "input_x_gradient": 100}}
METHODS = ("normxlogit", "nx-fast", "nx-all", "saliency", "input_x_gradient",
           "integrated_gradients", "naive")
GRADIENT = ("saliency", "input_x_gradient", "integrated_gradients")
SHORT = {"integrated_gradients": "IG", "input_x_gradient": "IxG", "saliency": "Saliency"}


@dataclass
class Settings:
    layers: int = 4
    width: int = 256
    vocab: int = 32000
    length: int = 256
    probes: int = 8  # N instances timed per call
    batch_size: int = 8  # rows per forward in the timed calls (attribute's batch_size)
    n_steps: int = 50
    naive_rows: int = 2  # naive lens: rows per micro-batch (its logits are (L+1)*rows*T*V)
    warmup: int = 1
    repeats: int = 5
    slow_repeats: int = 3  # IG and naive
    budget_gib: float = 1.0
    search: str = "slope"
    memory: bool = True
    timing: bool = True


QUICK = Settings(length=128, probes=4, batch_size=4, repeats=3, slow_repeats=1)
DEFAULT = Settings()


# --------------------------------------------------------------------------- methods


def naive_lens(model, ids, mask) -> torch.Tensor:
    """NormXLogit at every layer without row selection (all logits materialised)."""
    body = model.base_model
    norm = body.norm if hasattr(body, "norm") else body.ln_f
    num_layers = model.config.num_hidden_layers
    rows = torch.arange(ids.shape[0], device=ids.device)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True,
                    use_cache=False)
        hs, last = out.hidden_states, out.logits  # last: (B, T, V)
        lens = torch.empty((num_layers + 1, *last.shape), dtype=last.dtype, device=last.device)
        for i in range(num_layers):
            lens[i] = model.lm_head(norm(hs[i]))
        lens[num_layers] = last
        targets = last[rows, -1].argmax(-1)
        index = targets.view(1, -1, 1, 1).expand(num_layers + 1, -1, ids.shape[1], 1)
        logat = lens.gather(-1, index).squeeze(-1).float()
        return hs[0].float().norm(dim=-1) * logat  # (L+1, B, T)


def make_call(method: str, model, ids, mask, targets, *, batch_size: int | None, n_steps: int,
              naive_rows: int | None = None) -> Callable[[], object]:
    """A zero-argument call of `method` on (ids, mask). batch_size=None: one pass."""
    bs = batch_size or ids.shape[0]
    if method == "normxlogit":
        return lambda: attribute("normxlogit", model, ids, mask, batch_size=bs)
    if method == "nx-fast":
        return lambda: normxlogit(model, ids, mask, targets=targets, probabilities=False,
                                  batch_size=bs).scores
    if method == "nx-all":
        return lambda: normxlogit(model, ids, mask, layers="all", batch_size=bs).layer_scores
    if method in GRADIENT:
        if method == "integrated_gradients" and batch_size is None:
            bs = ids.shape[0] * n_steps  # every interpolated row of every instance at once
        return lambda: attribute(method, model, ids, mask, batch_size=bs, n_steps=n_steps)
    if method == "naive":
        step = naive_rows or ids.shape[0]

        def naive():
            return [naive_lens(model, ids[i:i + step], mask[i:i + step])
                    for i in range(0, ids.shape[0], step)]
        return naive
    raise ValueError(method)


def model_and_inputs(cfg: Settings, rows: int, device: str, dtype: torch.dtype):
    model = build(gpt2_config(cfg.vocab, cfg.layers, cfg.width), device, dtype)
    ids, mask = random_inputs(cfg.vocab, rows, cfg.length, device)
    with torch.no_grad():
        targets = model(input_ids=ids, attention_mask=mask, logits_to_keep=1,
                        use_cache=False).logits[:, -1].argmax(-1)
    return model, ids, mask, targets


# --------------------------------------------------------------------------- memory


def memory_child(args) -> int:
    """Measurements in this (fresh) process, in the order given; prints one JSON line.

    `--specs` is a list of [rows, one_pass]. Before each measurement: gc, malloc_trim, the
    baseline RSS, and a reset of the high-water mark, so later ones do not see earlier peaks.
    """
    cfg = Settings(**json.loads(args.settings))
    specs = json.loads(args.specs)
    set_threads(args.threads)
    import captum.attr  # noqa: F401  (imported before the baseline: its import is not the method)

    dtype = getattr(torch, args.dtype)
    rows_needed = max(max(r for r, _ in specs), 1)
    model, ids, mask, targets = model_and_inputs(cfg, rows_needed, args.device, dtype)
    resolve_adapter(model)
    # Lazy initialisation (kernels, Captum, Python code) is not the method's memory.
    make_call(args.method, model, ids[:1], mask[:1], targets[:1], batch_size=None,
              n_steps=cfg.n_steps)()
    out = []
    for rows, one_pass in specs:
        call = make_call(args.method, model, ids[:rows], mask[:rows], targets[:rows],
                         batch_size=None if one_pass else cfg.batch_size, n_steps=cfg.n_steps,
                         naive_rows=None if one_pass else cfg.naive_rows)
        base = live_rss()
        ok = reset_peak()
        start = time.perf_counter()
        call()
        seconds = time.perf_counter() - start
        peak_hwm = hwm() - base if ok else None
        # ru_maxrss never resets: a valid cross-check only for the first (or largest) call.
        peak_maxrss = maxrss() - base
        out.append({"rows": rows, "one_pass": one_pass,
                    "peak": peak_hwm if ok else peak_maxrss, "peak_hwm": peak_hwm,
                    "peak_maxrss": peak_maxrss, "baseline_rss": base, "seconds": seconds})
        del call
    print(json.dumps(out))
    return 0


def measure_memory(method: str, specs: list[tuple[int, bool]], cfg: Settings,
                   args) -> list[dict]:
    """Peak memory above the baseline for each (rows, one_pass), in one fresh process."""
    if args.device == "cuda":  # in process: the caching allocator's counters are exact
        return [_memory_in_process(method, rows, one_pass, cfg, args)
                for rows, one_pass in specs]
    cmd = [sys.executable, __file__, "--mem-child", method, "--specs", json.dumps(specs),
           "--settings", json.dumps(asdict(cfg)), "--device", args.device,
           "--dtype", args.dtype]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = dict(os.environ)
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        # Killed for memory (the budget search may probe large batches) reads as "too big".
        return [{"peak": math.inf, "rows": rows, "one_pass": one_pass,
                 "error": done.stderr[-2000:]} for rows, one_pass in specs]
    return json.loads(done.stdout.strip().splitlines()[-1])


_GPU_CACHE: dict = {}


def _memory_in_process(method, rows, one_pass, cfg, args) -> dict:
    dtype = getattr(torch, args.dtype)
    key = (cfg.layers, cfg.width, cfg.vocab, cfg.length)
    if _GPU_CACHE.get("key") != key or _GPU_CACHE["ids"].shape[0] < rows:
        _GPU_CACHE.clear()
        _GPU_CACHE.update(zip(("model", "ids", "mask", "targets"),
                              model_and_inputs(cfg, max(rows, 64), args.device, dtype),
                              strict=True), key=key)
    model = _GPU_CACHE["model"]
    ids, mask, targets = (_GPU_CACHE[k][:rows] for k in ("ids", "mask", "targets"))
    call = make_call(method, model, ids, mask, targets,
                     batch_size=None if one_pass else cfg.batch_size, n_steps=cfg.n_steps,
                     naive_rows=None if one_pass else cfg.naive_rows)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    try:
        call()
        torch.cuda.synchronize()
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"peak": math.inf, "rows": rows, "error": "OutOfMemoryError"}
    return {"peak": torch.cuda.max_memory_allocated() - base, "rows": rows}


def second_size(method: str) -> int:
    """The larger of the two one-pass sizes the slope is fitted on."""
    return 2 if method == "integrated_gradients" else 8


def largest_batch(method: str, cfg: Settings, args, log: list,
                  known: dict[int, float] | None = None) -> dict:
    """Most instances per single pass with peak memory under the budget.

    `known`: peaks already measured (rows -> bytes) in the method's first process.
    """
    budget = cfg.budget_gib * 2**30
    known = dict(known or {})

    def peak(b: int) -> float:
        if b in known:
            return known[b]
        r = measure_memory(method, [(b, True)], cfg, args)[0]  # a fresh process per trial
        known[b] = r["peak"]
        log.append({"method": method, "rows": b, "peak": r["peak"], "fresh_process": True})
        shown = gib(r["peak"]) if math.isfinite(r["peak"]) else "failed"
        print(f"    {method:22s} B={b:<5d} peak {shown}", flush=True)
        return r["peak"]

    if cfg.search == "bisect":
        lo, hi = 0, 1
        while peak(hi) <= budget:
            lo, hi = hi, hi * 2
        while hi - lo > max(1, lo // 20):
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if peak(mid) <= budget else (lo, mid)
        return {"batch": lo, "how": "doubling + bisection, a fresh process per trial"}

    # slope: a linear fit through the two sizes measured first, then secant steps through
    # the nearest measured points (each a fresh process) until the largest fitting size is
    # known to 5%: peak per row is not constant (allocator thresholds), so one fit is not
    # enough.
    b1, b2 = 1, second_size(method)
    if peak(b1) > budget:
        return {"batch": 0, "how": "slope", "peak_at_1": known[b1]}
    peak(b2)
    first_fit = (known[b2] - known[b1]) / (b2 - b1)
    if cfg.search == "slope-only":  # the prediction alone, no verification
        guess = max(b2 + math.floor((budget - known[b2]) / max(first_fit, 1.0)), 0)
        return {"batch": guess, "how": "predicted from the per-row slope, not verified",
                "per_row_first_fit": first_fit}
    for _ in range(10):
        fits = sorted(b for b, v in known.items() if v <= budget)
        over = sorted(b for b, v in known.items() if v > budget)
        lo, hi = fits[-1], (over[0] if over else None)
        if hi is not None and hi - lo <= max(1, lo // 20):
            break
        below = [b for b in fits if b < lo]
        ref = hi if hi is not None else (below[-1] if below else None)
        slope = (known[ref] - known[lo]) / (ref - lo) if ref is not None and math.isfinite(
            known[ref]) else first_fit
        guess = lo + int((budget - known[lo]) / max(slope, 1.0))
        if hi is not None:
            guess = min(max(guess, lo + 1), hi - 1)
            if guess in (lo + 1, hi - 1) and hi - lo > 2:
                guess = (lo + hi) // 2
        else:  # aim 5% past the prediction so that an upper bound turns up
            guess = max(int(guess * 1.05), lo + 1)
        peak(guess)
    fits = sorted(b for b, v in known.items() if v <= budget)
    return {"batch": fits[-1], "how": "slope fit + secant steps, each in a fresh process",
            "per_row_first_fit": first_fit, "verified_peak": known[fits[-1]],
            "smallest_over": min((b for b, v in known.items() if v > budget), default=None)}


# --------------------------------------------------------------------------- main


def run(cfg: Settings, args) -> dict:
    device, dtype = args.device, getattr(torch, args.dtype)
    methods = [m for m in METHODS if m not in args.skip]
    model, ids, mask, targets = model_and_inputs(cfg, cfg.probes, device, dtype)
    calls = {m: make_call(m, model, ids, mask, targets, batch_size=cfg.batch_size,
                          n_steps=cfg.n_steps, naive_rows=cfg.naive_rows) for m in methods}
    result: dict = {"methods": methods}
    if cfg.timing:
        slow = {"integrated_gradients": cfg.slow_repeats, "naive": cfg.slow_repeats}
        print(f"timing {', '.join(methods)} on {cfg.probes} x {cfg.length} tokens", flush=True)
        started = time.perf_counter()
        samples, ratios = paired_rounds(calls, "normxlogit", cfg.repeats, device,
                                        warmup=cfg.warmup, repeats_for=slow)
        result.update({
            "time_per_instance_s": {m: median(samples[m]) / cfg.probes for m in methods},
            "ratio_to_normxlogit": {m: median(ratios[m]) for m in methods if m in ratios},
            "rounds": {m: len(samples[m]) for m in methods},
            "timing_s": time.perf_counter() - started})
        for m in methods:
            print(f"    {m:22s} {result['time_per_instance_s'][m]:.4f} s/instance  "
                  f"{result['ratio_to_normxlogit'].get(m, 1.0):7.2f}x normxlogit", flush=True)
    del model, calls
    if device == "cuda":
        _GPU_CACHE.clear()
        torch.cuda.empty_cache()

    if cfg.memory:
        print("memory (CPU: one fresh process per method for the timed call and the two "
              "one-pass sizes of the slope; GPU: in process):", flush=True)
        result["peak_timed_call"], result["largest_batch"] = {}, {}
        log: list = []
        for m in methods:
            b2 = second_size(m)
            first = measure_memory(m, [(cfg.probes, False), (1, True), (b2, True)], cfg, args)
            result["peak_timed_call"][m] = first[0]
            print(f"    {m:22s} timed call ({cfg.probes} x {cfg.length}) peak "
                  f"{gib(first[0]['peak'])};  one pass B=1 {gib(first[1]['peak'])}, "
                  f"B={b2} {gib(first[2]['peak'])}", flush=True)
            log += [{"method": m, **r} for r in first]
            if m == "nx-all":
                continue  # normxlogit's pattern plus (L+1)·B·T·d for the lens
            known = {} if cfg.search == "bisect" else {1: first[1]["peak"], b2: first[2]["peak"]}
            result["largest_batch"][m] = largest_batch(m, cfg, args, log, known)
        result["memory_trials"] = log
    return result


def report(cfg: Settings, res: dict) -> str:
    t = res.get("time_per_instance_s", {})
    r = res.get("ratio_to_normxlogit", {})
    lines = ["| method | s / instance | x normxlogit (paired) | peak, timed call "
             f"| largest batch, 1 pass, {cfg.budget_gib:g} GiB | normxlogit batch / this |",
             "|---|---|---|---|---|---|"]
    batches = res.get("largest_batch", {})
    nxb = batches.get("normxlogit", {}).get("batch")
    for m in res["methods"]:
        peak = res.get("peak_timed_call", {}).get(m, {}).get("peak")
        b = batches.get(m, {}).get("batch")
        ratio = f"{r[m]:.2f}" if m in r else ("1.00" if m == "normxlogit" and r else "-")
        lines.append(
            f"| {m} | {f'{t[m]:.4f}' if m in t else '-'} | {ratio} "
            f"| {gib(peak) if peak is not None else '-'} | {'-' if b is None else b} "
            f"| {'-' if not (b and nxb) else f'{nxb / b:.0f}'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (also in subprocesses)")
    p.add_argument("--layers", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--vocab", type=int)
    p.add_argument("--length", type=int)
    p.add_argument("--probes", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--repeats", type=int)
    p.add_argument("--budget-gib", type=float)
    p.add_argument("--search", choices=("slope", "bisect", "slope-only"))
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--no-timing", action="store_true")
    p.add_argument("--skip", nargs="*", default=[], choices=METHODS)
    p.add_argument("--out", type=Path)
    p.add_argument("--mem-child", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--specs", help=argparse.SUPPRESS)
    p.add_argument("--settings", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.mem_child:
        args.method = args.mem_child
        return memory_child(args)
    set_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch.cuda.is_available() is False")
    cfg = QUICK if args.quick else DEFAULT
    overrides = {k: getattr(args, k) for k in ("layers", "width", "vocab", "length", "probes",
                                               "batch_size", "repeats", "budget_gib", "search")
                 if getattr(args, k) is not None}
    cfg = replace(cfg, **overrides, memory=not args.no_memory, timing=not args.no_timing)
    info = machine(args.device, args.dtype)
    print_header("NormXLogit vs gradient methods and the naive lens", info, asdict(cfg))
    warn_if_busy(args.device)
    started = time.perf_counter()
    res = run(cfg, args)
    elapsed = time.perf_counter() - started
    print()
    print(report(cfg, res))
    r, b = res.get("ratio_to_normxlogit", {}), res.get("largest_batch", {})
    print("\nheadline (this run | paper, 48 GB GPU, length 512):")
    for m in GRADIENT:
        if m in res["methods"]:
            line = f"  {SHORT[m]:8s}"
            if m in r:
                line += f" time / normxlogit: {r[m]:7.1f}x"
            if m == "integrated_gradients" and m in r:
                line += f"  | paper {1.79 / 0.36:.1f}x"
            if m in b and b[m]["batch"]:
                line += (f";  batch normxlogit / {SHORT[m]}: "
                         f"{b['normxlogit']['batch'] / b[m]['batch']:.0f}x"
                         f"  | paper {750 / PAPER['batch'][m]:.1f}x")
            elif m in b:
                line += f";  batch: {SHORT[m]} fits 0 instances in one pass"
            print(line)
    print(f"\nrun took {elapsed:.0f} s; load average at the end "
          f"{tuple(round(x, 2) for x in os.getloadavg())}")
    if args.out:
        args.out.write_text(json.dumps({"machine": info, "settings": asdict(cfg), "results": res,
                                        "elapsed_s": elapsed}, indent=2, default=str))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
