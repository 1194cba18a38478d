"""How close NormXLogit comes to the cost of one forward pass of the transformer body.

    python benchmarks/floor.py            # a few minutes on 2 CPU cores
    python benchmarks/floor.py --quick    # about a minute
    python benchmarks/floor.py --device cuda --dtype bfloat16 --out results.json
    python benchmarks/floor.py --threads 1   # on a machine other jobs share (see below)

Models are built from Hugging Face configs with random weights (nothing is
downloaded): a Llama shape (untied head, GQA, RMSNorm) and a GPT-2 shape (tied
head, LayerNorm with biases), both 4 layers of width 256, each at a small (8k)
and a Llama-3-sized (128k) vocabulary.

For every (model, vocabulary, length) the same inputs go through, interleaved
repeat by repeat so that drift of the machine hits every method alike:

- floor:    `model.base_model(ids, mask, output_hidden_states=True)` under no_grad,
            eval mode (the L+1 hidden states, nothing else);
- predict:  `model(ids, mask, logits_to_keep=1)`, the model's own prediction at
            the last position (body + one row of logits), for reference;
- nx-last:  `normxlogit(model, ids, mask, layers=None, batch_size=None)`;
- nx-all:   the same with `layers="all"` (logit lens for the target, L+1 layers);
- nx-fast, nx-all-fast: nx-last and nx-all with the targets given (the model's argmax,
            computed once beforehand) and `probabilities=False`: only the B target rows
            of the unembedding are read, no full-vocabulary logits or softmax;
- naive:    NormXLogit without row selection: the full model forward with
            full-vocabulary logits at every position, and the final norm +
            lm_head applied to every hidden state, all (L+1, B, T, V) logits
            materialised, then the target's column gathered.

Each timed call sits between two floor calls; its ratio is its time over their
mean, and the tables give the median ratio (`time.perf_counter`, CUDA
synchronised).
A second table splits nx-all into its parts (hooked body forward, the
vocabulary-sized head on the B explained rows, the lens over all layers) to show
where time above the floor goes. The goal stated for the package:
nx-all <= 1.15x the floor, flat in vocabulary size.

On a CPU that other processes share, torch's default of one OpenMP thread per
core makes every parallel region wait for whichever thread was descheduled, and
a 20 ms forward can take a second. `--threads 1` avoids that pathology; the
"floor jitter" column (median change between consecutive floor calls) shows how
quiet the machine was.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import transformers as T

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout too
from normx_callbacks import normxlogit, resolve_adapter  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import timed  # noqa: E402

T.logging.set_verbosity_error()

GOAL = 1.15  # nx-all / floor, from the issue


# --------------------------------------------------------------------------- models


def llama_config(vocab: int) -> T.PretrainedConfig:
    return T.LlamaConfig(
        hidden_size=256,
        intermediate_size=688,  # ~8/3 d, as Llama
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA, as Llama 3
        vocab_size=vocab,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )


def gpt2_config(vocab: int) -> T.PretrainedConfig:
    return T.GPT2Config(
        n_layer=4, n_embd=256, n_head=4, vocab_size=vocab, n_positions=2048,
        bos_token_id=0, eos_token_id=0,
    )


MODELS: dict[str, Callable[[int], T.PretrainedConfig]] = {
    "llama": llama_config,
    "gpt2": gpt2_config,
}
VOCABS = {"8k": 8192, "128k": 128256}  # 128256 = Llama 3's vocabulary


def final_norm(model: torch.nn.Module) -> torch.nn.Module:
    """The body's final norm, for the naive logit lens (named per family on purpose)."""
    body = model.base_model
    return body.norm if hasattr(body, "norm") else body.ln_f


# --------------------------------------------------------------------------- settings


@dataclass
class Settings:
    lengths: tuple[int, ...]
    batch: int  # rows per call; normxlogit gets batch_size=None, so one forward each
    warmup: int
    repeats: int
    naive_repeats: int  # the naive lens is 10-100x slower; fewer repeats keep runs short
    naive_max_gib: float  # skip the naive lens above this materialised size
    models: tuple[str, ...] = tuple(MODELS)
    vocabs: tuple[str, ...] = tuple(VOCABS)


QUICK = Settings(lengths=(64, 256), batch=4, warmup=1, repeats=5, naive_repeats=1,
                 naive_max_gib=1.0)
DEFAULT = Settings(lengths=(64, 256, 512), batch=4, warmup=2, repeats=11, naive_repeats=2,
                   naive_max_gib=2.5)


@dataclass
class Row:
    model: str
    vocab: int
    length: int
    batch: int
    times_ms: dict[str, float] = field(default_factory=dict)  # median per method
    spread_ms: dict[str, tuple[float, float]] = field(default_factory=dict)  # (min, max)
    ratios: dict[str, float] = field(default_factory=dict)  # median of per-round ratios
    naive_logits_bytes: int = 0
    naive_skipped: bool = False
    floor_jitter: float = 0.0  # median |change| between consecutive floor calls

    def ratio(self, method: str) -> float | None:
        return self.ratios.get(method)


# --------------------------------------------------------------------------- methods


def make_methods(model, ids, mask, naive: bool) -> dict[str, Callable[[], object]]:
    adapter = resolve_adapter(model)  # cached; resolution is a one-time cost, kept out
    num_layers = adapter.num_layers
    rows = torch.arange(ids.shape[0], device=ids.device)
    positions = torch.full_like(rows, ids.shape[1] - 1)
    norm = final_norm(model)

    def floor():
        with torch.no_grad():
            return model.base_model(
                input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False
            )

    def predict():
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask, logits_to_keep=1, use_cache=False)

    def nx_last():
        return normxlogit(model, ids, mask, layers=None, batch_size=None)

    def nx_all():
        return normxlogit(model, ids, mask, layers="all", batch_size=None)

    with torch.no_grad():
        given = model(input_ids=ids, attention_mask=mask, logits_to_keep=1,
                      use_cache=False).logits[:, -1].argmax(-1)

    def nx_fast():
        return normxlogit(model, ids, mask, targets=given, probabilities=False, layers=None,
                          batch_size=None)

    def nx_all_fast():
        return normxlogit(model, ids, mask, targets=given, probabilities=False, layers="all",
                          batch_size=None)

    def naive_lens():
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True,
                        use_cache=False)
            hs = out.hidden_states  # L+1 x (B, T, d); the last one already normed
            last = out.logits  # (B, T, V)
            lens = torch.empty((num_layers + 1, *last.shape), dtype=last.dtype,
                               device=last.device)  # (L+1, B, T, V)
            for i in range(num_layers):
                lens[i] = model.lm_head(norm(hs[i]))
            lens[num_layers] = last
            targets = last[rows, positions].argmax(-1)  # (B,)
            index = targets.view(1, -1, 1, 1).expand(num_layers + 1, -1, ids.shape[1], 1)
            logat = lens.gather(-1, index).squeeze(-1).float()  # (L+1, B, T)
            scores = hs[0].float().norm(dim=-1) * logat
            return scores, lens.numel() * lens.element_size()

    # nx-all taken apart, with the adapter's own public pieces.
    states_box: list = []

    def part_body():
        with torch.no_grad():
            states_box[:] = [adapter.hidden_states(ids, mask)]

    def part_head():
        with torch.no_grad():
            last = states_box[0][-1]
            full = adapter.full_logits(last[rows, positions])  # (B, V)
            targets = full.argmax(-1)
            full.softmax(-1)[rows, targets]
            states_box.append(targets)

    def part_lens():
        with torch.no_grad():
            states, targets = states_box[0], states_box[-1]
            lens = torch.stack(
                [adapter.final_norm(s) for s in states[:-1]] + [states[-1]]
            )  # (L+1, B, T, d)
            logat = adapter.target_logits(lens, targets)  # (L+1, B, T)
            each = torch.stack([s.float().norm(dim=-1) for s in states]) * logat
            return logat, each

    methods = {
        "floor": floor,
        "predict": predict,
        "nx-last": nx_last,
        "nx-all": nx_all,
        "nx-fast": nx_fast,
        "nx-all-fast": nx_all_fast,
        "part:body": part_body,  # runs before part:head and part:lens (dict order)
        "part:head": part_head,
        "part:lens": part_lens,
    }
    if naive:
        methods["naive"] = naive_lens
    return methods


def measure(name: str, vocab_label: str, length: int, cfg: Settings, device: str,
            dtype: torch.dtype) -> Row:
    vocab = VOCABS[vocab_label]
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(MODELS[name](vocab))
    model = model.to(device=device, dtype=dtype).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (cfg.batch, length), generator=g).to(device)
    mask = torch.ones_like(ids)

    num_layers = model.config.num_hidden_layers
    itemsize = torch.finfo(dtype).bits // 8
    naive_bytes = (num_layers + 1) * cfg.batch * length * vocab * itemsize
    naive = naive_bytes <= cfg.naive_max_gib * 2**30
    methods = make_methods(model, ids, mask, naive)
    row = Row(name, vocab, length, cfg.batch, naive_logits_bytes=naive_bytes,
              naive_skipped=not naive)

    for _ in range(cfg.warmup):
        for method, fn in methods.items():
            if method != "naive":
                fn()
    if naive:
        methods["naive"]()

    # Every timed call sits between two floor calls and is divided by their mean:
    # on a shared machine a slow stretch then moves numerator and denominator
    # together. The order of the main methods rotates from round to round.
    samples: dict[str, list[float]] = {m: [] for m in methods}
    paired: dict[str, list[float]] = {m: [] for m in methods if m != "floor"}
    jitter: list[float] = []  # |floor_after / floor_before - 1|: how noisy the machine was
    main = ["predict", "nx-last", "nx-all", "nx-fast", "nx-all-fast"]
    parts = ("part:body", "part:head", "part:lens")  # must run in this order
    for rep in range(cfg.repeats):
        k = rep % len(main)
        groups: list[tuple[str, ...]] = [(m,) for m in main[k:] + main[:k]] + [parts]
        if naive and rep < cfg.naive_repeats:
            groups.append(("naive",))
        before = timed(methods["floor"], device)
        samples["floor"].append(before)
        for group in groups:
            ts = [timed(methods[m], device) for m in group]
            after = timed(methods["floor"], device)
            samples["floor"].append(after)
            jitter.append(abs(after / before - 1))
            for m, t in zip(group, ts, strict=True):
                samples[m].append(t)
                paired[m].append(t / ((before + after) / 2))
            before = after
    for method, ts in samples.items():
        row.times_ms[method] = 1e3 * statistics.median(ts)
        row.spread_ms[method] = (1e3 * min(ts), 1e3 * max(ts))
    for method, rs in paired.items():
        row.ratios[method] = statistics.median(rs)
    # Fastest over fastest: what each costs when the machine left it alone.
    row.ratios["nx-all min/min"] = min(samples["nx-all"]) / min(samples["floor"])
    row.ratios["nx-all/predict"] = statistics.median(
        [a / p for a, p in zip(paired["nx-all"], paired["predict"], strict=True)]
    )
    row.floor_jitter = statistics.median(jitter)
    del model, methods
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


# --------------------------------------------------------------------------- report


def machine(device: str, dtype: str) -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores_visible": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": T.__version__,
        "python": platform.python_version(),
        "device": device,
        "dtype": dtype,
        "load_average_at_start": os.getloadavg(),  # a shared machine shows here
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def table(rows: list[Row]) -> str:
    head = ("| model | vocab | B x T | floor ms | nx-last | nx-all | nx-all (min/min) | predict "
            "| nx-all / predict | nx-fast | nx-all-fast | naive | naive ms | naive logits "
            "| floor jitter |")
    lines = [head, "|" + "---|" * 15]
    for r in rows:
        skipped = r.naive_skipped
        naive = "skipped" if skipped else fmt_ratio(r.ratio("naive"))
        naive_ms = "-" if skipped else f"{r.times_ms['naive']:.0f}"
        lines.append(
            f"| {r.model} | {r.vocab} | {r.batch} x {r.length} | {r.times_ms['floor']:.1f} "
            f"| {fmt_ratio(r.ratio('nx-last'))} | {fmt_ratio(r.ratio('nx-all'))} "
            f"| {fmt_ratio(r.ratio('nx-all min/min'))} | {fmt_ratio(r.ratio('predict'))} "
            f"| {fmt_ratio(r.ratio('nx-all/predict'))} | {fmt_ratio(r.ratio('nx-fast'))} "
            f"| {fmt_ratio(r.ratio('nx-all-fast'))} | {naive} | {naive_ms} "
            f"| {gib(r.naive_logits_bytes)} | {100 * r.floor_jitter:.0f}% |"
        )
    return "\n".join(lines)


def parts_table(rows: list[Row]) -> str:
    head = ("| model | vocab | B x T | nx-all | body (hooked) | head on B rows | lens, L+1 layers "
            "| other | head on B rows ms |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        body, head_, lens = (r.ratio(f"part:{p}") for p in ("body", "head", "lens"))
        other = r.ratio("nx-all") - body - head_ - lens
        lines.append(
            f"| {r.model} | {r.vocab} | {r.batch} x {r.length} | {fmt_ratio(r.ratio('nx-all'))} "
            f"| {body:.2f} | {head_:.2f} | {lens:.2f} | {other:+.2f} "
            f"| {r.times_ms['part:head']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="about a minute on 2 CPU cores")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--out", type=Path, help="write all numbers as JSON here")
    p.add_argument("--batch", type=int, help="rows per call (default 4)")
    p.add_argument("--lengths", type=int, nargs="+", help="sequence lengths to run")
    p.add_argument("--repeats", type=int, help="timed repeats per method (median reported)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch.cuda.is_available() is False")

    cfg = QUICK if args.quick else DEFAULT
    if args.batch:
        cfg = replace(cfg, batch=args.batch)
    if args.lengths:
        cfg = replace(cfg, lengths=tuple(args.lengths))
    if args.repeats:
        cfg = replace(cfg, repeats=args.repeats)
    dtype = getattr(torch, args.dtype)
    info = machine(args.device, args.dtype)
    print(f"# NormXLogit floor ratio ({'quick' if args.quick else 'default'} mode)")
    print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    for key, value in info.items():
        print(f"{key}: {value}")
    print(f"settings: {asdict(cfg)}", flush=True)
    busy = os.getloadavg()[0]
    if args.device == "cpu" and torch.get_num_threads() > 1 and busy > 0.5:
        print(f"warning: load average {busy:.1f} before starting: other processes share "
              "this CPU; with several threads the timings will be erratic (try --threads 1)",
              flush=True)

    started = time.perf_counter()
    rows = []
    for name in cfg.models:
        for vocab_label in cfg.vocabs:
            for length in cfg.lengths:
                row = measure(name, vocab_label, length, cfg, args.device, dtype)
                rows.append(row)
                print(f"  {name:5s} V={row.vocab:<6d} T={length:<4d} floor "
                      f"{row.times_ms['floor']:7.1f} ms  nx-all {fmt_ratio(row.ratio('nx-all'))}x"
                      f"  nx-all-fast {fmt_ratio(row.ratio('nx-all-fast'))}x", flush=True)
    elapsed = time.perf_counter() - started

    print("\nRatios to the floor (median over calls of time / mean of the floor calls "
          "just before and after; floor ms and naive ms are medians):\n")
    print(table(rows))
    print("\nWhere nx-all's time goes (in units of the floor, paired like the ratios; "
          "other = nx-all - the three parts):\n")
    print(parts_table(rows))
    worst = max(r.ratio("nx-all") for r in rows)
    worst_fast = max(r.ratio("nx-all-fast") for r in rows)
    print(f"\nnx-all / floor: worst {worst:.2f}; nx-all-fast (targets given, "
          f"probabilities=False): worst {worst_fast:.2f} (goal <= {GOAL:.2f}); run took "
          f"{elapsed:.0f} s; load average at the end {os.getloadavg()}")

    if args.out:
        args.out.write_text(json.dumps(
            {"machine": info, "settings": asdict(cfg), "goal": GOAL, "elapsed_s": elapsed,
             "rows": [asdict(r) for r in rows]},
            indent=2,
        ))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
