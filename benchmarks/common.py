"""Helpers shared by the benchmark scripts (not a test module, not part of the package).

Machine description, paired timing, resident-memory probes and the random-weight model
shapes the scripts build from Hugging Face configs (nothing is downloaded).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime
import gc
import os
import platform
import re
import resource
import statistics
import sys
import time
from collections.abc import Callable
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


# --------------------------------------------------------------------------- machine


def now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def machine(device: str, dtype: str = "float32") -> dict:
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
        "date": now(),
        "cpu": cpu,
        "cores_visible": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": T.__version__,
        "python": platform.python_version(),
        "device": device,
        "dtype": dtype,
        "load_average_at_start": tuple(round(x, 2) for x in os.getloadavg()),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def print_header(title: str, info: dict, settings: dict | None = None) -> None:
    print(f"# {title}")
    for key, value in info.items():
        print(f"{key}: {value}")
    if settings is not None:
        print(f"settings: {settings}")
    sys.stdout.flush()


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def warn_if_busy(device: str) -> None:
    busy = os.getloadavg()[0]
    if device == "cpu" and torch.get_num_threads() > 1 and busy > 0.5:
        print(f"warning: load average {busy:.1f}: other processes share this CPU; with "
              "several threads timings are erratic (try --threads 1)", flush=True)


# --------------------------------------------------------------------------- timing


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def median(xs) -> float:
    return statistics.median(xs) if xs else float("nan")


def paired_rounds(methods: dict[str, Callable[[], object]], baseline: str, repeats: int,
                  device: str, *, warmup: int = 1,
                  repeats_for: dict[str, int] | None = None) -> tuple[dict, dict]:
    """Times every method between two calls of `baseline`, rotating the order per round.

    Returns (samples: method -> [seconds], ratios: method -> [t / mean(adjacent baseline)]).
    `repeats_for` caps the rounds of slow methods (they run in the first rounds only).
    """
    repeats_for = repeats_for or {}
    for _ in range(warmup):
        for fn in methods.values():
            fn()
    others = [m for m in methods if m != baseline]
    samples: dict[str, list[float]] = {m: [] for m in methods}
    ratios: dict[str, list[float]] = {m: [] for m in others}
    for rep in range(repeats):
        k = rep % max(len(others), 1)
        order = [m for m in others[k:] + others[:k] if rep < repeats_for.get(m, repeats)]
        before = timed(methods[baseline], device)
        samples[baseline].append(before)
        for m in order:
            t = timed(methods[m], device)
            after = timed(methods[baseline], device)
            samples[baseline].append(after)
            samples[m].append(t)
            ratios[m].append(t / ((before + after) / 2))
            before = after
    return samples, ratios


# --------------------------------------------------------------------------- memory


def proc_status(field: str) -> int:
    """A numeric field of /proc/self/status (Vm* sizes in bytes, counts as they are)."""
    text = Path("/proc/self/status").read_text()
    value = int(re.search(rf"^{field}:\s+(\d+)", text, re.M).group(1))
    return value * 1024 if field.startswith("Vm") else value


def rss() -> int:
    return proc_status("VmRSS")


def hwm() -> int:
    return proc_status("VmHWM")


def live_rss() -> int:
    """RSS once garbage is collected and freed heap is returned to the system."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
    return rss()


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def maxrss() -> int:
    """ru_maxrss of this process in bytes (Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.0f} MiB"


# --------------------------------------------------------------------------- models


def gpt2_config(vocab: int, layers: int, width: int, heads: int | None = None,
                positions: int = 2048) -> T.PretrainedConfig:
    return T.GPT2Config(
        n_layer=layers, n_embd=width, n_head=heads or max(width // 64, 1), vocab_size=vocab,
        n_positions=positions, bos_token_id=0, eos_token_id=0,
        attn_implementation="sdpa",
    )


def llama_config(vocab: int, layers: int, width: int, heads: int | None = None,
                 kv_heads: int | None = None, intermediate: int | None = None,
                 positions: int = 2048, tied: bool = False) -> T.PretrainedConfig:
    heads = heads or max(width // 64, 1)
    return T.LlamaConfig(
        hidden_size=width, intermediate_size=intermediate or int(8 * width / 3 / 8 + 1) * 8,
        num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads or max(heads // 4, 1), vocab_size=vocab,
        max_position_embeddings=positions, tie_word_embeddings=tied,
        attn_implementation="sdpa",
    )


def build(config: T.PretrainedConfig, device: str = "cpu",
          dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.device(device):  # a 1B model is initialised on the GPU, not the CPU
        model = T.AutoModelForCausalLM.from_config(config)
    return model.to(device=device, dtype=dtype).eval()


def random_inputs(vocab: int, batch: int, length: int, device: str = "cpu",
                  seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=g).to(device)
    return ids, torch.ones_like(ids)
