"""Regenerate the README's pictures: TensorBoard (custom scalars, images, text) and the report.

    .venv/bin/python docs/screenshots.py            # trains configs/tiny.yaml into a temp dir
    .venv/bin/python docs/screenshots.py --run DIR  # or pictures of an existing run directory

Runs the demo (unless --run), serves its log directory with the venv's TensorBoard on a free
local port, and takes each picture with headless Chromium (`apt-get install chromium`);
the report is written by `normx report` and photographed the same way. Writes
docs/images/{tensorboard-custom-scalars,tensorboard-images,tensorboard-text,report}.png.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "docs" / "images"
BIN = Path(sys.executable).parent
TABS = {  # picture -> TensorBoard tab (URL fragment)
    "tensorboard-custom-scalars": "custom_scalars",
    "tensorboard-images": "images",
    "tensorboard-text": "text",
}


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    sys.exit("docs/screenshots.py: headless Chromium is needed: apt-get install -y chromium")


def screenshot(url: str, out: Path, size: tuple[int, int], profile: Path, wait_ms: int) -> None:
    """One PNG of ``url`` at ``size`` after ``wait_ms`` of the page's own (virtual) time."""
    subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu",
                    "--hide-scrollbars", "--disable-dev-shm-usage", "--no-first-run",
                    f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}",
                    f"--virtual-time-budget={wait_ms}", f"--screenshot={out}", url],
                   check=True, capture_output=True, timeout=180)
    print(f"wrote {out.relative_to(ROOT)}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train(work: Path) -> Path:
    """The demo run (configs/tiny.yaml) into ``work``; returns its log directory."""
    subprocess.run([sys.executable, str(ROOT / "train.py"), "fit", "--config",
                    str(ROOT / "configs" / "tiny.yaml"), "--trainer.default_root_dir", str(work),
                    "--trainer.logger.init_args.save_dir", str(work),
                    "--trainer.enable_progress_bar", "false",
                    "--data.cache_dir", str(ROOT / ".normx_cache")], check=True, cwd=ROOT)
    return next(work.rglob("events.out.tfevents*")).parent


def tensorboard_pictures(log_dir: Path, profile: Path) -> None:
    port = free_port()
    server = subprocess.Popen([str(BIN / "tensorboard"), "--logdir", str(log_dir), "--host",
                               "127.0.0.1", "--port", str(port),
                               "--samples_per_plugin", "images=200,text=200"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/"
        for _ in range(120):  # TensorBoard takes a few seconds to read the event files
            try:
                urllib.request.urlopen(url + "data/runs", timeout=2).read()
                break
            except OSError:
                time.sleep(0.5)
        time.sleep(3)
        for name, tab in TABS.items():
            screenshot(f"{url}#{tab}", IMAGES / f"{name}.png", (1400, 1000), profile, 15000)
    finally:
        server.terminate()
        server.wait(timeout=30)


def report_picture(log_dir: Path, work: Path, profile: Path) -> None:
    out = work / "report.html"
    subprocess.run([str(BIN / "normx"), "report", str(log_dir), "-o", str(out), "-q",
                    "--max-probes", "2"], check=True)
    screenshot(out.as_uri(), IMAGES / "report.png", (1400, 2600), profile, 3000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="log directory of an existing run")
    args = parser.parse_args()
    IMAGES.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="normx-screenshots-") as tmp:
        work = Path(tmp)
        log_dir = args.run.resolve() if args.run else train(work / "run")
        tensorboard_pictures(log_dir, work / "profile")
        report_picture(log_dir, work, work / "profile")


if __name__ == "__main__":
    main()
