"""Start-up: how long the commands a user types often take before they do anything, against importing torch.

Each command runs in a fresh interpreter, the way a shell runs it; the figure is the median wall time of
``--rounds`` runs. ``import torch`` (what every command used to pay) is timed the same way, and each command is
reported as a ratio of it.

Usage: python bench/startup_bench.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _median_seconds(args: list[str], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        subprocess.run(args, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    from pipeline.cache import write_features

    with tempfile.TemporaryDirectory() as tmp:
        cache = write_features(Path(tmp) / "train.h5", np.zeros((100, 1280), np.float32), np.arange(100) % 10,
                               [f"c{i}" for i in range(10)], {"model": "mobilenet_v2", "weights": "IMAGENET1K_V1", "taps": ["t"], "preprocess": {}})
        py = [sys.executable]
        cases = {
            "python -c 'import torch' (reference)": py + ["-c", "import torch"],
            "pipeline --help": py + ["-m", "pipeline", "--help"],
            "pipeline --version": py + ["-m", "pipeline", "--version"],
            "pipeline extract --help": py + ["-m", "pipeline", "extract", "--help"],
            "pipeline info CACHE": py + ["-m", "pipeline", "info", str(cache)],
        }
        seconds = {name: _median_seconds(cmd, args.rounds) for name, cmd in cases.items()}
    ref = seconds["python -c 'import torch' (reference)"]
    print(f"| command | median wall, s ({args.rounds} runs) | against import torch |")
    print("|---|---|---|")
    for name, s in seconds.items():
        print(f"| `{name}` | {s:.2f} | {s / ref:.2f}x |")


if __name__ == "__main__":
    main()
