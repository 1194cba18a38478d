"""Everything of floor.py, compare.py and scaling.py on one GPU, in one prepared run.

    python benchmarks/gpu.py --out "$OUT"                  # a few minutes on one H100/H200
    python benchmarks/gpu.py --models gpt2-124m --out "$OUT"
    python benchmarks/gpu.py --device cpu --tiny --out /tmp/gpu-smoke   # smoke test on CPU

The GPU image of this workplace has torch, transformers and lightning but not Captum; carry
the pure-Python package from the local venv and put it on PYTHONPATH (BENCHMARKS.md, "GPU").

Models (random weights from Hugging Face configs, nothing is downloaded), bfloat16:

- gpt2-124m: GPT-2 small (12 layers, d=768, 12 heads, vocabulary 50257, tied head);
- llama-1b:  a Llama-3.2-1B shape (16 layers, d=2048, 32 heads, 8 KV heads, MLP 8192,
             vocabulary 128256, tied head), 1.24B parameters.

Probe set: 256 random sequences of 512 tokens, every method explaining the model's argmax
at the last position. Parts, per model:

1. floor:   floor (`base_model(..., output_hidden_states=True)`), predict
            (`model(..., logits_to_keep=1)`), nx (`normxlogit`, defaults), nx-fast (targets
            given, probabilities=False), nx-all, nx-all-fast, all over the 256 probes in
            micro-batches of 32, interleaved with the floor; median paired ratios.
2. compare: time per instance of saliency and input_x_gradient (first 32 probes,
            batch_size 8), integrated_gradients (n_steps=50, first 4 probes, 25 interpolated
            rows per pass) and the naive all-layer lens (first 8 probes, one row per pass),
            against nx per instance from part 1 (256 probes, batch 32); plus
            `torch.cuda.max_memory_allocated` above the allocation before each timed call.
3. batch:   the largest number of instances in ONE pass whose peak allocation stays under
            `--budget-gib` (default 40, the paper's 48 GB GPU less the model and headroom):
            doubling then bisection to 5%, in process, a CUDA OOM counting as over budget.
            IG's instances carry their 50 interpolated rows (internal_batch_size = B * 50).
4. scaling: vocabulary (32000, 128256, 256000) and length (128 .. 2048 at 16384 tokens
            per call) on the GPT-2-small body, ratios to the floor (scaling.py's sweeps).

Writes `gpu.json` and `gpu.md` under `--out` (default `$OUT`, else the current directory).
Training overhead is not measured here: configs/tiny.yaml is a CPU job (see overhead.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scaling  # noqa: E402
from common import (  # noqa: E402
    build,
    gib,
    gpt2_config,
    hwm,
    live_rss,
    llama_config,
    machine,
    median,
    paired_rounds,
    random_inputs,
    reset_peak,
    set_threads,
    sync,
    timed,
)
from compare import make_call  # noqa: E402

from normx_callbacks import normxlogit  # noqa: E402

try:  # the GPU image has no Captum: carry it (see BENCHMARKS.md, "GPU"), else gradient
    import captum.attr  # noqa: F401  methods are skipped and the report says so
    HAVE_CAPTUM = True
except ImportError:
    HAVE_CAPTUM = False
GRADIENT = ("saliency", "input_x_gradient", "integrated_gradients")


def model_configs(tiny: bool) -> dict:
    if tiny:
        return {
            "gpt2-tiny": gpt2_config(4096, 2, 64, heads=2),
            "llama-tiny": llama_config(4096, 2, 64, heads=2, kv_heads=1, tied=True),
        }
    return {
        "gpt2-124m": gpt2_config(50257, 12, 768, heads=12, positions=1024),
        "llama-1b": llama_config(128256, 16, 2048, heads=32, kv_heads=8, intermediate=8192,
                                 tied=True),
    }


@dataclass
class Settings:
    probes: int = 256
    length: int = 512
    batch: int = 32  # micro-batch of the floor part
    repeats: int = 5
    grad_probes: int = 32  # saliency / input_x_gradient
    grad_batch: int = 8
    ig_probes: int = 4
    ig_batch: int = 25  # interpolated rows per pass
    naive_probes: int = 8
    n_steps: int = 50
    budget_gib: float = 40.0
    max_batch: int = 4096  # the search stops doubling here
    scaling_vocabs: tuple[int, ...] = (32000, 128256, 256000)
    scaling_lengths: tuple[int, ...] = (128, 512, 2048)
    scaling_tokens: int = 16384
    scaling_width: int = 768
    scaling_layers: int = 12


TINY = Settings(probes=8, length=32, batch=4, repeats=2, grad_probes=2, grad_batch=2,
                ig_probes=1, ig_batch=10, naive_probes=2, n_steps=10, budget_gib=0.05,
                max_batch=256, scaling_vocabs=(1024, 4096), scaling_lengths=(16, 64),
                scaling_tokens=128, scaling_width=64, scaling_layers=2)


# --------------------------------------------------------------------------- memory


def peak_of(call, device: str) -> float:
    """Peak memory of one call above what was allocated before it (bytes)."""
    if device == "cuda":
        sync(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        try:
            call()
            sync(device)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            return math.inf
        return torch.cuda.max_memory_allocated() - base
    base = live_rss()  # CPU smoke test only: in process, so a rough number
    reset_peak()
    call()
    return hwm() - base


def largest_batch(method: str, model, ids_of, cfg: Settings, device: str) -> dict:
    budget = cfg.budget_gib * 2**30
    trials = {}

    def fits(b: int) -> bool:
        ids, mask, targets = ids_of(b)
        call = make_call(method, model, ids, mask, targets, batch_size=None,
                         n_steps=cfg.n_steps)
        trials[b] = peak_of(call, device)
        return trials[b] <= budget

    lo, hi = 0, 1
    while hi <= cfg.max_batch and fits(hi):
        lo, hi = hi, hi * 2
    if hi > cfg.max_batch:
        return {"batch": lo, "capped": True, "trials": trials}
    while hi - lo > max(1, lo // 20):
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return {"batch": lo, "capped": False, "trials": trials}


# --------------------------------------------------------------------------- parts


def part_floor(model, ids, mask, targets, cfg: Settings, device: str) -> dict:
    bs = cfg.batch

    def chunks(fn):
        def run():
            with torch.no_grad():
                for i in range(0, ids.shape[0], bs):
                    fn(ids[i:i + bs], mask[i:i + bs])
        return run

    calls = {
        "floor": chunks(lambda i, m: model.base_model(
            input_ids=i, attention_mask=m, output_hidden_states=True, use_cache=False)),
        "predict": chunks(lambda i, m: model(input_ids=i, attention_mask=m, logits_to_keep=1,
                                             use_cache=False)),
        "nx": lambda: normxlogit(model, ids, mask, batch_size=bs),
        "nx-fast": lambda: normxlogit(model, ids, mask, targets=targets, probabilities=False,
                                      batch_size=bs),
        "nx-all": lambda: normxlogit(model, ids, mask, layers="all", batch_size=bs),
        "nx-all-fast": lambda: normxlogit(model, ids, mask, layers="all", targets=targets,
                                          probabilities=False, batch_size=bs),
    }
    samples, ratios = paired_rounds(calls, "floor", cfg.repeats, device, warmup=1)
    n = ids.shape[0]
    return {"s_per_instance": {m: median(s) / n for m, s in samples.items()},
            "ratio_to_floor": {m: median(r) for m, r in ratios.items()}}


def part_compare(model, ids, mask, targets, cfg: Settings, device: str, nx_per: float) -> dict:
    plan = {
        "saliency": (cfg.grad_probes, cfg.grad_batch, None),
        "input_x_gradient": (cfg.grad_probes, cfg.grad_batch, None),
        "integrated_gradients": (cfg.ig_probes, cfg.ig_batch, None),
        "naive": (cfg.naive_probes, None, 1),
    }
    out = {}
    for method, (n, bs, naive_rows) in plan.items():
        if method in GRADIENT and not HAVE_CAPTUM:
            print(f"    {method:22s} skipped: captum is not installed", flush=True)
            continue
        call = make_call(method, model, ids[:n], mask[:n], targets[:n], batch_size=bs or n,
                         n_steps=cfg.n_steps, naive_rows=naive_rows)
        call()  # warm-up
        times = [timed(call, device) for _ in range(2 if method == "integrated_gradients"
                                                    else 3)]
        per = median(times) / n
        out[method] = {"instances": n, "batch_size": bs, "s_per_instance": per,
                       "x_normxlogit": per / nx_per, "peak_bytes": peak_of(call, device)}
        print(f"    {method:22s} {per:.4f} s/instance  {per / nx_per:7.1f}x nx  peak "
              f"{gib(out[method]['peak_bytes'])}", flush=True)
    n = cfg.batch
    nx_call = make_call("normxlogit", model, ids[:n], mask[:n], targets[:n], batch_size=n,
                        n_steps=cfg.n_steps)
    out["normxlogit"] = {"instances": cfg.probes, "batch_size": cfg.batch,
                         "s_per_instance": nx_per, "x_normxlogit": 1.0,
                         "peak_bytes": peak_of(nx_call, device)}
    return out


def part_batch(model, vocab: int, cfg: Settings, device: str) -> dict:
    cache: dict = {}

    def ids_of(b):
        if cache.get("n", 0) < b:
            ids, mask = random_inputs(vocab, max(b, 64), cfg.length, device, seed=2)
            with torch.no_grad():
                t = torch.cat([model(input_ids=ids[i:i + 64], attention_mask=mask[i:i + 64],
                                     logits_to_keep=1, use_cache=False).logits[:, -1].argmax(-1)
                               for i in range(0, ids.shape[0], 64)])
            cache.update(n=ids.shape[0], ids=ids, mask=mask, targets=t)
        return cache["ids"][:b], cache["mask"][:b], cache["targets"][:b]

    out = {}
    for method in ("normxlogit", "nx-fast", "saliency", "input_x_gradient",
                   "integrated_gradients", "naive"):
        if method in GRADIENT and not HAVE_CAPTUM:
            continue
        out[method] = largest_batch(method, model, ids_of, cfg, device)
        capped = " (capped)" if out[method]["capped"] else ""
        print(f"    {method:22s} largest batch {out[method]['batch']}{capped}", flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
    return out


def part_scaling(cfg: Settings, device: str, dtype) -> list[dict]:
    sc = replace(scaling.DEFAULT, width=cfg.scaling_width, layers=cfg.scaling_layers,
                 vocabs=cfg.scaling_vocabs, lengths=cfg.scaling_lengths,
                 tokens_per_call=cfg.scaling_tokens, batch=max(cfg.scaling_tokens // 512, 1),
                 length=min(512, cfg.scaling_tokens), repeats=cfg.repeats,
                 sweeps=("vocab", "length"))
    return scaling.run(sc, device, dtype)


# --------------------------------------------------------------------------- report


def markdown(res: dict) -> str:
    lines = [f"# NormXLogit on {res['machine'].get('gpu', res['machine']['cpu'])}", "",
             f"date {res['machine']['date']}, dtype {res['machine']['dtype']}, settings "
             f"`{res['settings']}`", ""]
    if not res.get("captum"):
        lines += ["Captum was not installed: the gradient methods were skipped.", ""]
    for name, m in res["models"].items():
        if "error" in m:
            lines += [f"## {name}: failed", "", "```", m["error"], "```", ""]
            continue
        lines += [f"## {name} ({m['params'] / 1e6:.1f}M parameters)", "",
                  "| method | s / instance | x floor |", "|---|---|---|"]
        f = m["floor"]
        for k, v in f["s_per_instance"].items():
            lines.append(f"| {k} | {v:.5f} | {f['ratio_to_floor'].get(k, 1.0):.3f} |")
        if "compare" in m:
            lines += ["", "| method | instances | s / instance | x normxlogit | peak |",
                      "|---|---|---|---|---|"]
            for k, v in m["compare"].items():
                lines.append(f"| {k} | {v['instances']} | {v['s_per_instance']:.4f} "
                             f"| {v['x_normxlogit']:.1f} | {gib(v['peak_bytes'])} |")
        if "batch" in m:
            nxb = m["batch"]["normxlogit"]["batch"]
            lines += ["", f"| method | largest batch in one pass, {res['settings']['budget_gib']}"
                      " GiB | normxlogit / this |", "|---|---|---|"]
            for k, v in m["batch"].items():
                ratio = f"{nxb / v['batch']:.0f}" if v["batch"] else "-"
                cap = " (search capped)" if v["capped"] else ""
                lines.append(f"| {k} | {v['batch']}{cap} | {ratio} |")
        lines.append("")
    if res.get("scaling"):
        lines += ["## scaling (GPT-2-small body)", "", scaling.tables(res["scaling"]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--tiny", action="store_true", help="tiny models and sizes (smoke test)")
    p.add_argument("--models", nargs="+", help="subset of the model names")
    p.add_argument("--parts", nargs="+", default=["floor", "compare", "batch", "scaling"],
                   choices=("floor", "compare", "batch", "scaling"))
    p.add_argument("--budget-gib", type=float)
    p.add_argument("--threads", type=int)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    args = p.parse_args(argv)
    set_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch.cuda.is_available() is False (use --device cpu --tiny)")
    cfg = TINY if args.tiny else Settings()
    if args.budget_gib:
        cfg = replace(cfg, budget_gib=args.budget_gib)
    dtype = getattr(torch, args.dtype)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    configs = model_configs(args.tiny)
    if args.models:
        configs = {k: v for k, v in configs.items() if k in args.models}
    args.out.mkdir(parents=True, exist_ok=True)
    res = {"machine": machine(args.device, args.dtype), "settings": asdict(cfg), "models": {},
           "captum": HAVE_CAPTUM}
    print(json.dumps(res["machine"]), flush=True)
    started = time.perf_counter()

    def save():
        res["elapsed_s"] = time.perf_counter() - started
        (args.out / "gpu.json").write_text(json.dumps(res, indent=2, default=str))
        (args.out / "gpu.md").write_text(markdown(res))

    for name, config in configs.items():
        print(f"== {name}", flush=True)
        entry: dict = {}
        res["models"][name] = entry
        try:
            t0 = time.perf_counter()
            model = build(config, args.device, dtype)
            entry["params"] = sum(p.numel() for p in model.parameters())
            vocab = config.vocab_size
            ids, mask = random_inputs(vocab, cfg.probes, cfg.length, args.device)
            with torch.no_grad():
                targets = torch.cat([
                    model(input_ids=ids[i:i + cfg.batch], attention_mask=mask[i:i + cfg.batch],
                          logits_to_keep=1, use_cache=False).logits[:, -1].argmax(-1)
                    for i in range(0, cfg.probes, cfg.batch)])
            entry["build_s"] = time.perf_counter() - t0
            if "floor" in args.parts or "compare" in args.parts:
                entry["floor"] = part_floor(model, ids, mask, targets, cfg, args.device)
                f = entry["floor"]["ratio_to_floor"]
                print("  floor: " + "  ".join(f"{k} {v:.3f}x" for k, v in f.items()), flush=True)
                save()
            if "compare" in args.parts:
                nx_per = entry["floor"]["s_per_instance"]["nx"]
                entry["compare"] = part_compare(model, ids, mask, targets, cfg, args.device,
                                                nx_per)
                save()
            del ids, mask, targets
            if "batch" in args.parts:
                entry["batch"] = part_batch(model, vocab, cfg, args.device)
                save()
            del model
        except Exception:  # one model failing must not lose the other's numbers
            entry["error"] = traceback.format_exc()
            print(entry["error"], flush=True)
        if args.device == "cuda":
            torch.cuda.empty_cache()
        save()
    if "scaling" in args.parts:
        print("== scaling", flush=True)
        try:
            res["scaling"] = part_scaling(cfg, args.device, dtype)
        except Exception:
            res["scaling_error"] = traceback.format_exc()
            print(res["scaling_error"], flush=True)
    save()
    print(markdown(res))
    print(f"\nwrote {args.out / 'gpu.json'} and {args.out / 'gpu.md'} in "
          f"{res['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
