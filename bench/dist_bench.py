"""Scaling figures for docs/scaling.md: cache bytes per image, shard and HDF5 write speed, decode speed, torchrun vs one process.

1. sizes: real MobileNetV2 features of Fashion-MNIST images (224 px), pooled and spatial taps, rewritten
   as caches in each dtype and compression; bytes per image from the files on disk.
2. writes: per-batch npz shards (with fsync, as extract writes them) and the HDF5 assembly, in MB/s.
3. decode: JPEG decode + the weights' resize/crop/normalise on one core, for ImageNet-sized synthetic JPEGs.
4. ranks: `torchrun --nproc-per-node 2` (gloo) against one process on the same images, wall time.

Usage: python bench/dist_bench.py [--data data/fashion-mnist] [--images 256] [--rounds 3] [--out bench/results/dist.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from extract_bench import subset  # noqa: E402
from synthetic import natural_jpeg  # noqa: E402

from pipeline import ExtractConfig, extract, load_backbone, read_cache, write_features  # noqa: E402
from pipeline.cache import PartialRun, write_cache  # noqa: E402
from pipeline.data import load_rgb  # noqa: E402


def sizes(data: Path, tmp: Path) -> list[dict]:
    config = ExtractConfig(data=str(data), split="test", weights="IMAGENET1K_V1", layers=("classifier:input", "features.18"), cache_dir=str(tmp / "sizes"))
    with read_cache(extract(config, progress=False).path) as c:
        feats = {t: c.features(t) for t in c.taps}
        labels, classes = c.labels, c.classes
    rows = []
    for tap, x in feats.items():
        # Enough rows for whole chunks (1 MiB each): a nearly empty last chunk would inflate small samples.
        x = np.tile(x, (max(1, 8192 // len(x)),) + (1,) * (x.ndim - 1)) if x[0].nbytes < 2**16 else x
        labels = np.resize(labels, len(x))
        for dtype in ("float32", "float16"):
            for comp in ("none", "lzf", "gzip"):
                path = tmp / f"{tap.replace(':', '-')}-{dtype}-{comp}.h5"
                write_features(path, x.astype(dtype), labels, classes, {"model": "mobilenet_v2"}, tap=tap, compression=comp)
                feature_bytes = x[0].size * np.dtype(dtype).itemsize
                rows.append({"tap": tap, "shape": list(x.shape[1:]), "dtype": dtype, "compression": comp,
                             "bytes_per_image": path.stat().st_size / len(x), "raw_bytes_per_image": feature_bytes,
                             "zero_fraction": float((x == 0).mean())})
    return rows


def writes(tmp: Path, rows: int = 20_000, dim: int = 1280, batch: int = 64) -> dict:
    x = np.random.default_rng(0).standard_normal((rows, dim), dtype=np.float32)
    partial = PartialRun(tmp / "w" / "train.h5")
    partial.final.parent.mkdir(parents=True)
    partial.start({"bench": True})
    t0 = time.perf_counter()
    for a in range(0, rows, batch):
        b = min(rows, a + batch)
        partial.write(a, b, [x[a:b]], np.arange(a, b), [])
    shard_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    write_cache(partial, tap_names=["t"], paths=[str(i) for i in range(rows)], labels=np.zeros(rows, int), classes=["a"], rejected=[], attrs={})
    assemble_s = time.perf_counter() - t0
    mb = x.nbytes / 2**20
    return {"MiB": mb, "batch_rows": batch, "shards_MiB_per_s": mb / shard_s, "assemble_MiB_per_s": mb / assemble_s}


def decode(tmp: Path, n: int = 100) -> dict:
    """ImageNet-like JPEGs: 500x375, quality 90, smooth colour fields with texture (~100 KB each)."""
    rng = np.random.default_rng(0)
    paths, kb = [], []
    for i in range(n):
        jpeg = natural_jpeg(rng)
        paths.append(tmp / f"{i}.jpg")
        paths[-1].write_bytes(jpeg)
        kb.append(len(jpeg) / 1024)
    import torch

    torch.set_num_threads(1)
    transform = load_backbone("mobilenet_v2", "none").preprocess.transform()  # resize 256, crop 224, normalise
    t0 = time.perf_counter()
    for p in paths:
        load_rgb(p)
    decode_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for p in paths:
        transform(load_rgb(p))
    full_s = time.perf_counter() - t0
    return {"images": n, "mean_KiB": float(np.mean(kb)), "decode_img_per_s_per_core": n / decode_s, "decode_transform_img_per_s_per_core": n / full_s}


def ranks(data: Path, tmp: Path, rounds: int) -> list[dict]:
    args = ["extract", "--data", str(data), "--split", "test", "--weights", "IMAGENET1K_V1", "--workers", "0", "--device", "cpu", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "PIPELINE_OFFLINE": "1"}
    runs: dict[tuple[str, str], list[tuple[float, float, int]]] = {}
    for i in range(rounds):  # interleaved, so the shared machine's load changes hit every variant alike
        for name, launcher, threads in (("1 process, 2 threads", [sys.executable, "-m", "pipeline"], "2"),
                                        ("torchrun 2 ranks (gloo), 1 thread each", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "pipeline"], "1")):
            for engine in ("onnx", "eager"):
                cache_dir = tmp / f"ranks-{i}-{len(runs)}-{engine}-{threads}"
                t0 = time.perf_counter()
                run = subprocess.run([*launcher, *args, "--engine", engine, "--cache-dir", str(cache_dir)], capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": threads})
                wall = time.perf_counter() - t0
                if run.returncode:
                    raise RuntimeError(run.stderr[-2000:])
                with read_cache(next(cache_dir.rglob("test.h5"))) as c:
                    runs.setdefault((name, engine), []).append((wall, c.attrs["images_per_s"], len(c)))
    return [{"run": name, "engine": engine, "images": r[0][2], "median_wall_s": float(np.median([w for w, _, _ in r])),
             "median_extract_img_per_s": float(np.median([v for _, v, _ in r])), "rounds": len(r)} for (name, engine), r in runs.items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="data/fashion-mnist")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="bench/results/dist.json")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="dist-bench-") as t:
        tmp = Path(t)
        data = subset(Path(a.data), a.images, tmp / "data")
        (tmp / "jpeg").mkdir()
        result = {"sizes": sizes(data, tmp), "writes": writes(tmp), "decode": decode(tmp / "jpeg"), "ranks": ranks(data, tmp, a.rounds)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    print("| tap | shape | dtype | compression | bytes/image | raw | zeros |\n|---|---|---|---|---|---|---|")
    for r in result["sizes"]:
        print(f"| {r['tap']} | {'x'.join(map(str, r['shape']))} | {r['dtype']} | {r['compression']} | {r['bytes_per_image']:,.0f} | {r['raw_bytes_per_image']:,} | {r['zero_fraction']:.2f} |")
    print(json.dumps({k: result[k] for k in ("writes", "decode", "ranks")}, indent=1))


if __name__ == "__main__":
    main()
