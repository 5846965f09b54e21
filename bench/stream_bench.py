"""Larger than memory: fit heads from a feature cache several times larger than a memory cap set on the process.

A synthetic cache with class structure is written in bounded memory. Each fit runs in a child process that
imports everything, then caps its address space at (what the imports took) + --cap-mb with RLIMIT_AS, so the
cache cannot be loaded whole. The in-memory path is run under the same cap to show that it cannot; both
streaming heads are also fitted without a cap, in memory and streamed, to compare accuracy.

Usage: python bench/stream_bench.py [--rows 200000] [--dims 1024] [--classes 20] [--cap-mb 256]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

from pipeline.cache import PartialRun, write_cache

SETTINGS = {"model": "synthetic", "weights": "none", "weights_sha256": None, "taps": ["pool:output"],
            "preprocess": {"crop": 0}, "amp": False, "dtype": "float32"}


def make_cache(path: Path, rows: int, dims: int, classes: int, seed: int, block: int = 8192) -> Path:
    """Class-structured ReLU features, written block by block (never all in memory)."""
    rng = np.random.default_rng(0)  # the same class structure for every split
    basis = rng.normal(size=(16, dims)).astype(np.float32)
    means = (rng.normal(size=(classes, 16)) @ basis / 4).astype(np.float32)
    rng = np.random.default_rng(seed)
    labels = np.sort(rng.integers(0, classes, rows))  # sorted by class, like a real cache
    partial = PartialRun(path)
    partial.start(SETTINGS)
    for a in range(0, rows, block):
        y = labels[a : a + block]
        x = np.maximum(means[y] + rng.normal(scale=4.0, size=(len(y), dims)).astype(np.float32), 0)
        partial.write(a, a + len(y), [x], np.arange(a, a + len(y)), [])
    attrs = {"settings": SETTINGS, **{k: v for k, v in SETTINGS.items() if k != "dtype"}, "dataset_fingerprint": f"synthetic-{seed}"}
    return write_cache(partial, tap_names=["pool:output"], paths=[f"row{i}" for i in range(rows)], labels=labels,
                       classes=[f"c{i}" for i in range(classes)], rejected=[], attrs=attrs)


CHILD = textwrap.dedent("""
    import json, resource, sys, time
    from pipeline.fit import HeadConfig, fit_head
    cap = int(sys.argv[1]); kw = json.loads(sys.argv[2])
    def vm(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    base, base_rss = vm("VmPeak:"), vm("VmRSS:")
    if cap:
        resource.setrlimit(resource.RLIMIT_AS, (base + cap, base + cap))
    t0 = time.perf_counter()
    try:
        r = fit_head(HeadConfig(**kw), out=kw.pop("out", None) or sys.argv[3])
        out = {"ok": True, "val_accuracy": r.val_accuracy, "seconds": time.perf_counter() - t0}
    except MemoryError as e:
        out = {"ok": False, "error": "MemoryError"}
    except Exception as e:
        out = {"ok": False, "error": f"{type(e).__name__}: {e}"[:200]}
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["base_vm_mb"], out["base_rss_mb"] = base / 2**20, base_rss / 2**20
    print(json.dumps(out))
""")


def child(cap_mb: int, out: Path, **kw: object) -> dict:
    # glibc gives each thread its own 64 MiB malloc arena of address space; two keep the cap about data, not threads.
    env = {**os.environ, "MALLOC_ARENA_MAX": "2"}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(cap_mb * 2**20), json.dumps(kw), str(out)], capture_output=True, text=True, env=env)
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"ok": False, "error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--dims", type=int, default=1024)
    ap.add_argument("--classes", type=int, default=20)
    ap.add_argument("--cap-mb", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--block-mb", type=int, default=16, help="shuffle buffer of the streaming heads")
    ap.add_argument("--out", default="bench/results/stream.json")
    args = ap.parse_args()
    results = {"args": vars(args), "runs": []}
    with tempfile.TemporaryDirectory(prefix="pipeline-stream-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        train = make_cache(tmp / "train.h5", args.rows, args.dims, args.classes, seed=1)
        val = make_cache(tmp / "val.h5", max(2000, args.rows // 50), args.dims, args.classes, seed=2)
        size_mb = train.stat().st_size / 2**20
        print(f"train cache {size_mb:.0f} MiB ({args.rows} x {args.dims} float32), written in {time.perf_counter() - t0:.0f} s; "
              f"cap {args.cap_mb} MiB above the imports ({size_mb / args.cap_mb:.1f}x smaller than the cache)", flush=True)
        results["cache_mb"] = size_mb
        common = {"train_cache": str(train), "val_cache": str(val), "refine": 0, "epochs": args.epochs, "block_mb": args.block_mb}
        runs = [
            ("linear", "in memory", 0, {"clf": "linear", "grid": [1e-3], "stream": False}),
            ("linear", "in memory", args.cap_mb, {"clf": "linear", "grid": [1e-3], "stream": False}),
            ("linear", "streamed", args.cap_mb, {"clf": "linear", "grid": [1e-3], "stream": True}),
            ("logreg", "streamed", args.cap_mb, {"clf": "logreg", "grid": [1.0], "stream": True}),
        ]
        for clf, mode, cap, kw in runs:
            r = child(cap, tmp / f"{clf}-{mode[:2]}", **common, **kw)
            results["runs"].append({"clf": clf, "mode": mode, "cap_mb": cap, **r})
            status = f"val acc {r['val_accuracy']:.4f} in {r['seconds']:.0f} s" if r.get("ok") else f"failed: {r.get('error')}"
            grown = r.get("peak_rss_mb", 0) - r.get("base_rss_mb", 0)
            print(f"{clf:<7} {mode:<10} cap {cap or 'none'} MiB: {status}; peak RSS grew {grown:.0f} MiB over the imports", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
