"""How NormXLogit's cost scales: with sequence length, vocabulary size, depth and the number
of probes, always against the forward-pass floor measured alongside.

    python benchmarks/scaling.py --threads 1          # ~10 minutes on 2 shared CPU cores
    python benchmarks/scaling.py --threads 1 --quick  # ~3 minutes
    python benchmarks/scaling.py --sweeps vocab depth --out scaling.json

Models are GPT-2 shapes with random weights (nothing is downloaded). Four sweeps, each
varying one thing from a base point:

- length:  T = 64 .. 2048 at a constant 2048 tokens per call (B = 2048 / T rows), so the
           time per token compares directly (base: 4 layers, d=256, vocabulary 32000);
- vocab:   V = 8k .. 256k (4 layers, d=256, B=4, T=256);
- depth:   L = 2 .. 16 layers (d=256, V=32000, B=4, T=256);
- probes:  N = 16 .. 512 probes of 64 tokens, micro-batches of 32 rows (batch_size=32),
           floor micro-batched the same way (4 layers, d=256, V=32000).

Methods at each point (interleaved round by round with the floor; ratios are medians of
time / mean of the floor calls just before and after):

- floor:       `model.base_model(..., output_hidden_states=True)`, no_grad (micro-batched
               like normxlogit in the probes sweep);
- nx:          `normxlogit(model, ids, mask)`: targets = argmax, probabilities=True (the
               default: a full-vocabulary softmax at the B explained rows);
- nx-fast:     `normxlogit(..., targets=t, probabilities=False)`: targets given, only the
               target rows of the unembedding are read;
- nx-all:      `layers="all"`, defaults; nx-all-fast: `layers="all"`, targets given,
               probabilities=False.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    build,
    gpt2_config,
    machine,
    median,
    paired_rounds,
    print_header,
    random_inputs,
    set_threads,
    warn_if_busy,
)

from normx_callbacks import normxlogit  # noqa: E402

SWEEPS = ("length", "vocab", "depth", "probes")


@dataclass
class Settings:
    lengths: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048)
    tokens_per_call: int = 2048
    vocabs: tuple[int, ...] = (8192, 32000, 128256, 256000)
    depths: tuple[int, ...] = (2, 4, 8, 16)
    probes: tuple[int, ...] = (16, 64, 128, 256, 512)
    probe_repeats: int = 3  # the 512-probe calls are the longest of all sweeps
    probe_length: int = 64
    probe_batch: int = 32
    width: int = 256
    layers: int = 4
    vocab: int = 32000
    batch: int = 4
    length: int = 256
    warmup: int = 1
    repeats: int = 5
    sweeps: tuple[str, ...] = SWEEPS
    methods: dict = field(default_factory=lambda: {
        "length": ("nx", "nx-all"),
        "vocab": ("nx", "nx-fast", "nx-all", "nx-all-fast"),
        "depth": ("nx", "nx-all"),
        "probes": ("nx", "nx-all"),
    })


QUICK = Settings(lengths=(64, 256, 1024, 2048), vocabs=(8192, 32000, 128256, 256000),
                 depths=(2, 4, 8), probes=(16, 128, 512), repeats=3, probe_repeats=2)
DEFAULT = Settings()


def calls(model, ids, mask, targets, methods, batch_size):
    bs = batch_size or ids.shape[0]

    def floor():
        with torch.no_grad():
            for i in range(0, ids.shape[0], bs):
                model.base_model(input_ids=ids[i:i + bs], attention_mask=mask[i:i + bs],
                                 output_hidden_states=True, use_cache=False)

    table = {
        "floor": floor,
        "nx": lambda: normxlogit(model, ids, mask, batch_size=bs),
        "nx-fast": lambda: normxlogit(model, ids, mask, targets=targets, probabilities=False,
                                      batch_size=bs),
        "nx-all": lambda: normxlogit(model, ids, mask, layers="all", batch_size=bs),
        "nx-all-fast": lambda: normxlogit(model, ids, mask, layers="all", targets=targets,
                                          probabilities=False, batch_size=bs),
    }
    return {m: table[m] for m in ("floor", *methods)}


def point(sweep: str, value: int, *, layers: int, width: int, vocab: int, batch: int,
          length: int, methods, cfg: Settings, device: str, dtype, batch_size=None) -> dict:
    model = build(gpt2_config(vocab, layers, width), device, dtype)
    ids, mask = random_inputs(vocab, batch, length, device)
    with torch.no_grad():
        targets = torch.cat([
            model(input_ids=ids[i:i + 64], attention_mask=mask[i:i + 64], logits_to_keep=1,
                  use_cache=False).logits[:, -1].argmax(-1)
            for i in range(0, batch, 64)])
    fns = calls(model, ids, mask, targets, methods, batch_size)
    samples, ratios = paired_rounds(fns, "floor", cfg.repeats, device, warmup=cfg.warmup)
    tokens = batch * length
    row = {"sweep": sweep, "value": value, "layers": layers, "width": width, "vocab": vocab,
           "batch": batch, "length": length, "tokens": tokens,
           "ms": {m: 1e3 * median(s) for m, s in samples.items()},
           "us_per_token": {m: 1e6 * median(s) / tokens for m, s in samples.items()},
           "ratio": {m: median(r) for m, r in ratios.items()}}
    del model, fns
    if device == "cuda":
        torch.cuda.empty_cache()
    shown = "  ".join(f"{m} {row['ratio'][m]:.2f}x" for m in methods)
    print(f"  {sweep:6s} {value:>7d}: floor {row['ms']['floor']:8.1f} ms "
          f"({row['us_per_token']['floor']:.1f} us/token)  {shown}", flush=True)
    return row


def run(cfg: Settings, device: str, dtype) -> list[dict]:
    rows = []
    base = {"layers": cfg.layers, "width": cfg.width, "vocab": cfg.vocab, "batch": cfg.batch,
            "length": cfg.length}
    kw = {"cfg": cfg, "device": device, "dtype": dtype}
    if "length" in cfg.sweeps:
        for t in cfg.lengths:
            b = max(cfg.tokens_per_call // t, 1)
            rows.append(point("length", t, **{**base, "batch": b, "length": t},
                              methods=cfg.methods["length"], **kw))
    if "vocab" in cfg.sweeps:
        for v in cfg.vocabs:
            rows.append(point("vocab", v, **{**base, "vocab": v},
                              methods=cfg.methods["vocab"], **kw))
    if "depth" in cfg.sweeps:
        for n in cfg.depths:
            rows.append(point("depth", n, **{**base, "layers": n},
                              methods=cfg.methods["depth"], **kw))
    if "probes" in cfg.sweeps:
        for n in cfg.probes:
            rows.append(point("probes", n, **{**base, "batch": n, "length": cfg.probe_length},
                              methods=cfg.methods["probes"], batch_size=cfg.probe_batch,
                              **{**kw, "cfg": replace(cfg, repeats=min(cfg.repeats,
                                                                       cfg.probe_repeats))}))
    return rows


def tables(rows: list[dict]) -> str:
    out = []
    for sweep in SWEEPS:
        sub = [r for r in rows if r["sweep"] == sweep]
        if not sub:
            continue
        methods = [m for m in sub[0]["ratio"]]
        head = (f"| {sweep} | B x T | floor ms | floor us/token | "
                + " | ".join(f"{m} / floor" for m in methods) + " | "
                + " | ".join(f"{m} us/token" for m in methods) + " |")
        out += [f"\n{sweep}:\n", head, "|" + "---|" * (4 + 2 * len(methods))]
        for r in sub:
            out.append(
                f"| {r['value']} | {r['batch']} x {r['length']} | {r['ms']['floor']:.1f} "
                f"| {r['us_per_token']['floor']:.1f} | "
                + " | ".join(f"{r['ratio'][m]:.2f}" for m in methods) + " | "
                + " | ".join(f"{r['us_per_token'][m]:.1f}" for m in methods) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--threads", type=int, help="torch.set_num_threads")
    p.add_argument("--sweeps", nargs="+", choices=SWEEPS)
    p.add_argument("--width", type=int, help="model width for every sweep (default 256)")
    p.add_argument("--repeats", type=int)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    set_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch.cuda.is_available() is False")
    cfg = QUICK if args.quick else DEFAULT
    if args.sweeps:
        cfg = replace(cfg, sweeps=tuple(args.sweeps))
    if args.width:
        cfg = replace(cfg, width=args.width)
    if args.repeats:
        cfg = replace(cfg, repeats=args.repeats)
    info = machine(args.device, args.dtype)
    print_header("NormXLogit scaling (length, vocabulary, depth, probes)", info, asdict(cfg))
    warn_if_busy(args.device)
    started = time.perf_counter()
    rows = run(cfg, args.device, getattr(torch, args.dtype))
    elapsed = time.perf_counter() - started
    print("\nRatios: median of time / mean of the adjacent floor calls. us/token: median call "
          "time / (B*T).")
    print(tables(rows))
    print(f"\nrun took {elapsed:.0f} s; load average at the end "
          f"{tuple(round(x, 2) for x in os.getloadavg())}")
    if args.out:
        args.out.write_text(json.dumps({"machine": info, "settings": asdict(cfg), "rows": rows,
                                        "elapsed_s": elapsed}, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
