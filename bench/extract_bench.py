"""Extraction throughput: `pipeline extract` against the naive loop of the source tutorial, same images, same run.

The naive loop is tutorial 002's: a DataLoader with num_workers=0, a forward hook that appends
``input[0][i].cpu().numpy()`` per sample to a Python list, then ``np.save``. Both sides tap the same
pooled features (the input of the final classifier layer), use the same weights' preprocessing and batch
size, and are timed from model construction to features on disk. The features are compared at the end.

Usage: python bench/extract_bench.py [--images 512 256] [--models mobilenet_v2 resnet50] [--rounds 3]
Throughputs are medians over interleaved rounds; the speed-up is the ratio of the medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline import ExtractConfig, extract, load_backbone, read_cache
from pipeline.backbones import WeightsUnavailableError, final_linear
from pipeline.data import DatasetSpec, load_split
from results import machine, save  # bench/ is on sys.path when a script of it runs

# Real weights where they are available offline; random weights cost the same time.
WEIGHTS = {"mobilenet_v2": "IMAGENET1K_V1", "resnet50": "IMAGENET1K_V2"}


def subset(data: Path, n: int, out: Path) -> Path:
    """A class-balanced subset of the test split, as symlinks in an image folder."""
    split = load_split(DatasetSpec(str(data)), "test")
    per_class = max(1, n // len(split.classes))
    taken: dict[int, int] = {}
    for path, label in zip(split.paths, split.labels.tolist()):
        if taken.get(label, 0) < per_class:
            taken[label] = taken.get(label, 0) + 1
            dst = out / path
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.symlink((data / path).resolve(), dst)
    return out


class NaiveDataset(Dataset):
    def __init__(self, root: Path, paths: list[str], transform) -> None:
        self.root, self.paths, self.transform = root, paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.open(self.root / self.paths[i]).convert("RGB")), 0


def naive(model_name: str, weights: str, data: Path, out: Path, batch_size: int) -> tuple[float, np.ndarray]:
    t0 = time.perf_counter()
    bb = load_backbone(model_name, weights)
    model = bb.model
    split = load_split(DatasetSpec(str(data)), "test")
    loader = DataLoader(NaiveDataset(data, split.paths, bb.preprocess.transform()), batch_size=batch_size, shuffle=False, num_workers=0)
    in_list = []

    def hook(module, input, output):
        for i in range(input[0].size(0)):
            in_list.append(input[0][i].cpu().numpy())

    layer_name, _ = final_linear(model)
    top = dict(model.named_modules())[layer_name.split(".")[0]]  # fc, or MobileNetV2's classifier block
    handle = top.register_forward_hook(hook)
    with torch.no_grad():
        for x, _ in loader:
            model(x)
    handle.remove()
    features = np.array(in_list)
    np.save(out / f"naive-{model_name}.npy", features)
    return time.perf_counter() - t0, features


def ours(model_name: str, weights: str, data: Path, out: Path, batch_size: int, engine: str, round_: int) -> tuple[float, float, np.ndarray, str]:
    """One fresh extraction (its own cache folder: a cache already there would be reused, not timed).

    Returns:
        (wall seconds from model construction to features on disk, seconds of the batch loop alone, features, engine).
    """
    t0 = time.perf_counter()
    result = extract(
        ExtractConfig(data=str(data), split="test", model=model_name, weights=weights, batch_size=batch_size, engine=engine,
                      cache_dir=str(out / f"{engine}-{model_name}-round{round_}")),
        progress=False,
    )
    seconds = time.perf_counter() - t0
    if result.status != "extracted":
        raise SystemExit(f"extract reported {result.status!r} for round {round_}: the benchmark must time a fresh extraction")
    with read_cache(result.path) as c:
        return seconds, result.seconds, c.features(), result.engine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="data/fashion-mnist")
    ap.add_argument("--images", type=int, nargs="+", default=[512, 256], help="images per model, in --models order")
    ap.add_argument("--models", nargs="+", default=["mobilenet_v2", "resnet50"])
    ap.add_argument("--rounds", type=int, default=3, help="alternating naive/pipeline rounds; medians are reported")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", default="bench/results/extract.json")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="pipeline-bench-") as tmp:
        tmp = Path(tmp)
        for model_name, n_images in zip(args.models, args.images + args.images[-1:] * len(args.models)):
            data = subset(Path(args.data), n_images, tmp / f"bench-{model_name}")
            n = len(load_split(DatasetSpec(str(data)), "test"))
            weights = WEIGHTS.get(model_name, "DEFAULT")
            try:
                load_backbone(model_name, weights)
            except WeightsUnavailableError:
                weights = "none"
            runs: dict[str, list[float]] = {"naive": [], "auto": [], "eager": []}
            loop: dict[str, list[float]] = {"auto": [], "eager": []}  # img/s of the batch loop alone (the ONNX export in it)
            diffs: dict[str, float] = {}
            used = {}
            for r in range(args.rounds):
                # Interleaved, so that a noisy neighbour slows both sides alike.
                t, f_naive = naive(model_name, weights, data, tmp, args.batch_size)
                runs["naive"].append(n / t)
                for engine in ("auto", "eager") if r == 0 else ("auto",):
                    t, t_loop, f_ours, used[engine] = ours(model_name, weights, data, tmp, args.batch_size, engine, r)
                    runs[engine].append(n / t)
                    loop[engine].append(n / t_loop)
                    diffs[engine] = float(np.abs(f_ours - f_naive).max()) / max(1.0, float(np.abs(f_naive).max()))
                print(f"{model_name} round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} img/s" for k, v in runs.items() if len(v) > r), flush=True)
            med = {k: statistics.median(v) for k, v in runs.items() if v}
            for engine in ("auto", "eager"):
                rows.append({
                    "model": model_name, "weights": weights, "images": n, "engine": used[engine], "rounds": len(runs[engine]),
                    "naive_img_s": med["naive"], "pipeline_img_s": med[engine], "ratio": med[engine] / med["naive"],
                    "max_rel_diff": diffs[engine], "naive_runs": runs["naive"], "pipeline_runs": runs[engine],
                    "pipeline_loop_img_s": statistics.median(loop[engine]),
                })
    meta = {**machine(), "batch_size": args.batch_size}
    save(args.out, meta, rows)
    print("\n| model | weights | pipeline engine | images | naive img/s | pipeline img/s (start-up included) | batch loop img/s | speed-up | max rel. diff vs naive |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['weights']} | {r['engine']} | {r['images']} | {r['naive_img_s']:.1f} | {r['pipeline_img_s']:.1f} | "
              f"{r['pipeline_loop_img_s']:.1f} | {r['ratio']:.2f}x | {r['max_rel_diff']:.1e} |")
    print(f"\n{meta}")


if __name__ == "__main__":
    main()
