"""Launching test runs: `train.py` arguments that shrink a config, and multi-process runs
(DDP, FSDP2) whose hang fails the test cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHRINK = ["--model.d_model", "32", "--model.n_layers", "2", "--model.n_heads", "2",
          "--data.num_probes", "4", "--data.batch_size", "8", "--data.num_workers", "0"]
PROSE = ("docs.yaml", "gpt2-small.yaml", "llama-1b.yaml")  # keep their vocabulary and context

_RANK_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK")


def run_ranks(script: Path, *args: str, cwd: Path, timeout: float, what: str,
              env: dict[str, str] | None = None) -> tuple[str, str]:
    """Run ``python script *args`` (which launches its own ranks) in its own session.

    The environment loses any rank variables of the calling process and gets the repository
    on ``PYTHONPATH``. A run that outlives ``timeout`` seconds is killed with all its ranks
    and fails the test naming ``what``; a non-zero exit fails it with the end of stderr.
    ``env`` replaces that environment. Returns (stdout, stderr).
    """
    if env is None:
        env = {k: v for k, v in os.environ.items() if k not in _RANK_VARIABLES}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.Popen([sys.executable, str(script), *args], env=env, cwd=str(cwd),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"the {what} run hung (a collective reached by one rank only?)")
    assert proc.returncode == 0, stderr[-4000:]
    return stdout, stderr


def train_args(config: str, tmp: Path, cache: Path, steps: int = 3) -> list[str]:
    """`train.py fit` arguments running `config` for `steps` steps, shrunk for tests."""
    args = ["fit", "--config", str(ROOT / "configs" / config),
            "--trainer.max_steps", str(steps), "--trainer.val_check_interval", "2",
            "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.default_root_dir", str(tmp),
            "--trainer.log_every_n_steps", "1",
            "--trainer.accelerator", "cpu", "--trainer.precision", "32-true",
            "--data.cache_dir", str(cache), *SHRINK]
    if config != "ddp-cpu.yaml":
        args += ["--trainer.devices", "1", "--trainer.strategy", "auto"]
    args += ["--trainer.logger.init_args.save_dir", str(tmp)]
    if config in PROSE:
        # One shared docs tokenizer (same corpus slice and vocabulary) trains once.
        args += ["--data.num_train", "200", "--data.bpe_vocab_size", "2048"]
    else:
        args += ["--data.num_train", "300", "--model.context", "32",
                 "--data.bpe_vocab_size", "512"]
    return args
