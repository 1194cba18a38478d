"""The one module the benchmark scripts share (not a test module, not part of the package).

Command line (`--quick`, `--device cpu|cuda`, `--dtype`, `--threads`, `--out`), machine
description, paired/interleaved timing with CUDA synchronisation, peak memory (CPU: VmHWM
after a reset; CUDA: `max_memory_allocated`), fresh child processes, the random-weight
model shapes built from Hugging Face configs (nothing is downloaded), Markdown tables and
JSON output.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import datetime
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import transformers as T

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout too
T.logging.set_verbosity_error()

try:  # glibc only; elsewhere RSS also holds freed heap pages
    _LIBC = ctypes.CDLL(ctypes.util.find_library("c"))
    _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
except (OSError, AttributeError, TypeError):
    _LIBC = None


# --------------------------------------------------------------------------- command line


def parser(doc: str, *, devices: bool = True) -> argparse.ArgumentParser:
    """The flags every script shares; `doc` is the script's docstring."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the short run (under a minute or so)")
    p.add_argument("--threads", type=int,
                   help="torch threads, also in child processes (default: torch's own)")
    p.add_argument("--out", type=Path, help="write all numbers as JSON here")
    if devices:
        p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
        p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                       help="default: float32 on cpu, bfloat16 on cuda")
    return p


def start(args, title: str, settings: dict | None = None) -> dict:
    """Applies threads and device checks, prints the header; returns the machine info."""
    set_threads(args.threads)
    device = getattr(args, "device", "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False; use --device cpu")
    if hasattr(args, "dtype"):
        args.dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    info = machine(device, getattr(args, "dtype", "float32"))
    print(f"# {title}{' (quick)' if args.quick else ''}")
    for key, value in {**info, "settings": settings}.items():
        print(f"{key}: {value}")
    busy = os.getloadavg()[0]
    if device == "cpu" and torch.get_num_threads() > 1 and busy > 0.5:
        print(f"warning: load average {busy:.1f}: other processes share this CPU; with "
              "several threads timings are erratic (try --threads 1)")
    sys.stdout.flush()
    return info


def finish(args, started: float, **payload) -> None:
    """Prints the run time and load; writes `payload` (and the run time) as JSON to --out."""
    elapsed = time.perf_counter() - started
    print(f"\nrun took {elapsed:.0f} s; load average at the end "
          f"{tuple(round(x, 2) for x in os.getloadavg())}")
    if args.out:
        args.out.write_text(json.dumps({**payload, "elapsed_s": elapsed}, indent=2,
                                       default=str))
        print(f"wrote {args.out}")


def machine(device: str = "cpu", dtype: str = "float32") -> dict:
    cpu = platform.processor() or "unknown"
    try:
        cpu = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(),
                        re.M).group(1)
    except (OSError, AttributeError):
        pass
    info = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "cpu": cpu, "cores_visible": len(os.sched_getaffinity(0)),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": T.__version__, "python": platform.python_version(),
            "device": device, "dtype": dtype,
            "load_average_at_start": tuple(round(x, 2) for x in os.getloadavg())}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def child_env(threads: int | None) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    if threads:  # also bounds the threads of libraries torch does not configure
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def run_child(cmd: Sequence[str], threads: int | None, cwd: Path = ROOT) -> tuple[dict, float]:
    """Runs `cmd` in a fresh process; returns (its last stdout line as JSON, wall seconds)."""
    began = time.perf_counter()
    done = subprocess.run([sys.executable, *map(str, cmd)], cwd=cwd, env=child_env(threads),
                          capture_output=True, text=True)
    wall = time.perf_counter() - began
    if done.returncode != 0:
        raise ChildFailed(f"{' '.join(map(str, cmd))} exited {done.returncode}:\n"
                          f"{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1]), wall


class ChildFailed(RuntimeError):
    pass


# --------------------------------------------------------------------------- timing


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str) -> float:
    sync(device)
    began = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - began


def median(xs) -> float:
    xs = list(xs)
    return statistics.median(xs) if xs else float("nan")


def paired_rounds(methods: dict[str, Callable[[], object]], baseline: str, repeats: int,
                  device: str, *, warmup: int = 1, repeats_for: dict[str, int] | None = None,
                  together: tuple[str, ...] = ()) -> tuple[dict, dict, list]:
    """Times every method between two calls of `baseline`, rotating the order per round.

    On a shared machine a slow stretch then moves a method and its baseline together.
    Returns (samples: method -> [s], ratios: method -> [t / mean(adjacent baselines)],
    jitter: [|baseline after / before - 1|]). `repeats_for` caps the rounds of slow methods
    (they run in the first rounds only); `together` names methods timed back to back, in
    that order, in one slot (parts of one computation that feed each other).
    """
    repeats_for = repeats_for or {}
    for _ in range(warmup):
        for fn in methods.values():
            fn()
    single = [m for m in methods if m != baseline and m not in together]
    samples: dict[str, list[float]] = {m: [] for m in methods}
    ratios: dict[str, list[float]] = {m: [] for m in methods if m != baseline}
    jitter: list[float] = []
    for rep in range(repeats):
        k = rep % max(len(single), 1)
        slots = [(m,) for m in single[k:] + single[:k]] + ([together] if together else [])
        slots = [s for s in slots if rep < repeats_for.get(s[0], repeats)]
        before = timed(methods[baseline], device)
        samples[baseline].append(before)
        for slot in slots:
            ts = [timed(methods[m], device) for m in slot]
            after = timed(methods[baseline], device)
            samples[baseline].append(after)
            jitter.append(abs(after / before - 1))
            for m, t in zip(slot, ts, strict=True):
                samples[m].append(t)
                ratios[m].append(t / ((before + after) / 2))
            before = after
    return samples, ratios, jitter


# --------------------------------------------------------------------------- memory


def proc_status(field: str) -> int:
    """A numeric field of /proc/self/status (Vm* sizes in bytes, counts as they are)."""
    value = int(re.search(rf"^{field}:\s+(\d+)", Path("/proc/self/status").read_text(),
                          re.M).group(1))
    return value * 1024 if field.startswith("Vm") else value


def rss() -> int:
    return proc_status("VmRSS")


def live_rss() -> int:
    """RSS once garbage is collected and freed heap is returned to the system."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
    return rss()


def reset_peak() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_of(call: Callable[[], object], device: str) -> float:
    """Peak memory of one call above what was in use just before it, in bytes.

    CUDA: `max_memory_allocated` above `memory_allocated`, an out-of-memory error reading
    as infinite. CPU: VmHWM after gc + malloc_trim + a reset of the high-water mark (exact
    in a fresh process, rough in a busy one); `ru_maxrss` instead where no reset is allowed.
    """
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
    import resource

    base = live_rss()
    exact = reset_peak()
    call()
    if exact:
        return proc_status("VmHWM") - base
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base


def gib(n: float) -> str:
    if not math.isfinite(n):
        return "over"
    return f"{n / 2**30:.2f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.0f} MiB"


# --------------------------------------------------------------------------- models

# Shapes with random weights. The toy shapes take a vocabulary; the real-size ones
# (GPT-2 small, a Llama-3.2-1B shape) carry their own.
SHAPES = {
    "gpt2": {"family": "gpt2", "layers": 4, "width": 256},
    "llama": {"family": "llama", "layers": 4, "width": 256, "kv_heads": 2, "intermediate": 688},
    "gpt2-124m": {"family": "gpt2", "layers": 12, "width": 768, "vocab": 50257},
    "llama-1b": {"family": "llama", "layers": 16, "width": 2048, "heads": 32, "kv_heads": 8,
                 "intermediate": 8192, "vocab": 128256, "tied": True},
}


def config(shape: str, vocab: int | None = None, **over) -> T.PretrainedConfig:
    """A Hugging Face config for a named shape; `over` replaces any of its entries."""
    s = {**SHAPES[shape], **over}
    vocab = vocab or s.get("vocab") or 32000
    width, layers = s["width"], s["layers"]
    heads = s.get("heads") or max(width // 64, 1)
    if s["family"] == "gpt2":
        return T.GPT2Config(n_layer=layers, n_embd=width, n_head=heads, vocab_size=vocab,
                            n_positions=4096, bos_token_id=0, eos_token_id=0,
                            attn_implementation="sdpa")
    return T.LlamaConfig(
        hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=s.get("intermediate") or int(8 * width / 3 / 8 + 1) * 8,
        num_key_value_heads=s.get("kv_heads") or max(heads // 4, 1), vocab_size=vocab,
        max_position_embeddings=4096, tie_word_embeddings=s.get("tied", False),
        attn_implementation="sdpa")


def build(cfg: T.PretrainedConfig, device: str = "cpu", dtype: str | torch.dtype = "float32",
          seed: int = 0) -> torch.nn.Module:
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    torch.manual_seed(seed)
    with torch.device(device):  # a 1B model is initialised on the GPU, not the CPU
        model = T.AutoModelForCausalLM.from_config(cfg)
    return model.to(device=device, dtype=dtype).eval()


def inputs(model, rows: int, length: int, device: str = "cpu", seed: int = 1, chunk: int = 64):
    """Random token ids, their all-ones mask and the model's argmax at the last position."""
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (rows, length),
                        generator=torch.Generator().manual_seed(seed)).to(device)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        targets = torch.cat([model(input_ids=ids[i:i + chunk], attention_mask=mask[i:i + chunk],
                                   logits_to_keep=1, use_cache=False).logits[:, -1].argmax(-1)
                             for i in range(0, rows, chunk)])
    return ids, mask, targets


def body_floor(model, ids, mask, batch_size: int | None = None) -> Callable[[], None]:
    """The floor: the body's L+1 hidden states, no_grad, micro-batched like normxlogit."""
    bs = batch_size or ids.shape[0]

    def floor():
        with torch.no_grad():
            for i in range(0, ids.shape[0], bs):
                model.base_model(input_ids=ids[i:i + bs], attention_mask=mask[i:i + bs],
                                 output_hidden_states=True, use_cache=False)
    return floor


def naive_lens(model, ids, mask) -> torch.Tensor:
    """NormXLogit at every layer without row selection: the full forward with all logits,
    final norm + lm_head on every hidden state, the (L+1, B, T, V) logits materialised,
    then the argmax target's column gathered."""
    body = model.base_model
    norm = body.norm if hasattr(body, "norm") else body.ln_f  # named per family on purpose
    layers = model.config.num_hidden_layers
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True,
                    use_cache=False)
        hs, last = out.hidden_states, out.logits  # the last hidden state is already normed
        lens = torch.empty((layers + 1, *last.shape), dtype=last.dtype, device=last.device)
        for i in range(layers):
            lens[i] = model.lm_head(norm(hs[i]))
        lens[layers] = last
        targets = last[:, -1].argmax(-1)
        index = targets.view(1, -1, 1, 1).expand(layers + 1, -1, ids.shape[1], 1)
        return hs[0].float().norm(dim=-1) * lens.gather(-1, index).squeeze(-1).float()


def free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- output


def ratio(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def table(head: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
