"""Measure the demo run and the test suite, and write both times into README.md with the date.

    .venv/bin/python docs/measure_timings.py          # or: make timings
    .venv/bin/python docs/measure_timings.py --skip-tests

The demo is `train.py fit --config configs/tiny.yaml` (what `make demo` runs, into a temp
directory) and the tests are `pytest -q -n 2 --dist worksteal` (what `make test` runs after
ruff). The text between `<!-- timings -->` and `<!-- /timings -->` in README.md is replaced; nothing else is.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
START, END = "<!-- timings -->", "<!-- /timings -->"


def timed(command: list[str], **kwargs) -> float:
    """Wall seconds of one command, which must succeed."""
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, **kwargs)
    return time.perf_counter() - start


def clock(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"


def machine() -> str:
    return f"{os.cpu_count()} CPU cores ({platform.machine()}), Python {platform.python_version()}"


def rewrite(readme: str, text: str) -> str:
    """``readme`` with the text between the markers replaced (markers must be there once)."""
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
    if len(pattern.findall(readme)) != 1:
        raise SystemExit(f"README.md needs exactly one {START} ... {END} block")
    return pattern.sub(lambda _: f"{START}\n{text}\n{END}", readme)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-tests", action="store_true", help="measure the demo only")
    args = parser.parse_args()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cached = (ROOT / ".normx_cache").is_dir()  # the demo's tokenizer cache (configs/tiny.yaml)
    with tempfile.TemporaryDirectory(prefix="normx-timing-") as tmp:
        demo = timed([sys.executable, str(ROOT / "train.py"), "fit", "--config",
                      str(ROOT / "configs" / "tiny.yaml"), "--trainer.default_root_dir", tmp,
                      "--trainer.logger.init_args.save_dir", tmp,
                      "--trainer.enable_progress_bar", "false"], env=env)
    lines = [f"Measured {date.today().isoformat()} on {machine()} by `make timings`:",
             f"`make demo` takes {clock(demo)} "
             f"({'tokenizer cached' if cached else 'including training the tokenizer'})"]
    if not args.skip_tests:
        tests = timed([sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "worksteal"],
                      env=env)
        lines[-1] += f"; the tests of `make test` take {clock(tests)}."
    else:
        lines[-1] += "."
    README.write_text(rewrite(README.read_text(encoding="utf-8"), "\n".join(lines)),
                      encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
