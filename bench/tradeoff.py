"""The accuracy/time trade-offs behind `make all`'s defaults: image size, train-set size, and the fine-tune's subset.

1. Image size. The same class-balanced Fashion-MNIST subset (train, val carved from it, test) is extracted at
   several crops (the 28 px images are upscaled either way); for each: extraction throughput, and the test
   accuracy of a standardised logistic regression and an RBF SVM fitted on those features.
2. Train-set size. On the full 224 px caches that `make extract` wrote: the same two heads fitted on n images per
   class (stratified, seeded), with their fit time and test accuracy on the whole official test set.
3. Fine-tune cost. Seconds per training image and per evaluated image of a MobileNetV2 fine-tune on this machine,
   from a one-epoch LP-FT on a small subset; from it, the minutes that `make all`'s fine-tune would take with a
   given subset.

Usage: python bench/tradeoff.py [--crops 96 128 160 224] [--per-class 200] [--sizes 100 300 1000 3000 0]
Writes bench/results/tradeoff.json and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from pipeline import ExtractConfig, extract, read_cache
from pipeline.data import DatasetSpec, load_split, stratified_subset
from pipeline.extract import locate_cache

WEIGHTS = "IMAGENET1K_V1"


def link_subset(data: Path, out: Path, per_class: int, seed: int = 0) -> Path:
    """Symlink ``per_class`` train and ``per_class`` test images of each class into an image folder."""
    for split in ("train", "test"):
        s = load_split(DatasetSpec(str(data)), split)
        for i in stratified_subset(s.labels, per_class, seed):
            dst = out / s.paths[i]
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.symlink((data / s.paths[i]).resolve(), dst)
    return out


def heads() -> dict:
    return {
        "logreg": lambda: make_pipeline(StandardScaler(), LogisticRegression(C=0.01, max_iter=1000)),
        "svm-rbf": lambda: make_pipeline(StandardScaler(), PCA(256, svd_solver="randomized", random_state=0), SVC(C=3.0)),
    }


def fit_score(Xt: np.ndarray, yt: np.ndarray, Xs: np.ndarray, ys: np.ndarray) -> dict:
    out = {}
    for name, make in heads().items():
        t0 = time.perf_counter()
        model = make().fit(Xt, yt)
        fit = time.perf_counter() - t0
        out[name] = {"test": float((model.predict(Xs) == ys).mean()), "fit_s": fit}
    return out


def image_sizes(data: Path, crops: list[int], per_class: int, tmp: Path) -> list[dict]:
    root = link_subset(data, tmp / "subset", per_class)
    rows = []
    for crop in crops:
        source = ExtractConfig(data=str(root), model="mobilenet_v2", weights=WEIGHTS, crop=crop, resize=crop,
                               cache_dir=str(tmp / f"features-{crop}"))
        seconds, n = 0.0, 0
        arrays = {}
        for split in ("train", "test"):
            t0 = time.perf_counter()
            r = extract(replace(source, split=split), progress=False)
            seconds += time.perf_counter() - t0
            n += r.n_images
            with read_cache(r.path) as c:
                arrays[split] = (c.features(), c.labels)
        row = {"crop": crop, "images": n, "images_per_s": n / seconds, **fit_score(*arrays["train"], *arrays["test"])}
        rows.append(row)
        print(f"  crop {crop}: {row['images_per_s']:.0f} img/s, logreg {row['logreg']['test']:.4f}, svm-rbf {row['svm-rbf']['test']:.4f}", flush=True)
    return rows


def train_sizes(data: Path, sizes: list[int]) -> list[dict]:
    source = ExtractConfig(data=str(data), model="mobilenet_v2", weights=WEIGHTS)
    paths = {s: locate_cache(replace(source, split=s)) for s in ("train", "test")}
    if not all(p.is_file() for p in paths.values()):
        raise SystemExit(f"no full caches at {paths['train'].parent}; run make extract first")
    with read_cache(paths["train"]) as c:
        X, y = c.features(), c.labels
    with read_cache(paths["test"]) as c:
        Xs, ys = c.features(), c.labels
    rows = []
    for size in sizes:
        rows_idx = stratified_subset(y, size or None, 0)
        row = {"per_class": size or int(np.bincount(y).min()), "rows": len(rows_idx), **fit_score(X[rows_idx], y[rows_idx], Xs, ys)}
        rows.append(row)
        print(f"  {row['rows']} train rows: logreg {row['logreg']['test']:.4f} ({row['logreg']['fit_s']:.1f} s), "
              f"svm-rbf {row['svm-rbf']['test']:.4f} ({row['svm-rbf']['fit_s']:.1f} s)", flush=True)
    return rows


def finetune_cost(data: Path, tmp: Path, per_class: int = 20) -> dict:
    """Seconds per image of fine-tuning (forward and backward, eager) and of evaluation (eager and ONNX Runtime)."""
    from pipeline.artifacts import load_finetuned
    from pipeline.finetune import FinetuneConfig, finetune
    from pipeline.predict import image_logits

    config = FinetuneConfig(data=str(data), model="mobilenet_v2", weights=WEIGHTS, subset=per_class, eval_subset=1, epochs=1,
                            head_lr_mult=1.0, output_dir=str(tmp / "runs"), name="cost")
    result = finetune(config, progress=False)
    n_train = per_class * 10
    fm = load_finetuned(result.path)
    test = load_split(DatasetSpec(str(data)), "test")
    paths = [test.paths[i] for i in stratified_subset(test.labels, per_class, 0)]
    out = {"train_s_per_image": result.history[0]["seconds"] / n_train}
    for engine in ("eager", "auto"):
        t0 = time.perf_counter()
        image_logits(fm, data, paths, engine=engine)
        out[f"eval_{engine}_s_per_image"] = (time.perf_counter() - t0) / len(paths)
    return out


def make_all_minutes(cost: dict, per_class: int, epochs: int = 3, val_per_class: int = 50, test: int = 10_000) -> float:
    """make all's fine-tune: epochs of training and eager val evaluation, then the test set through ONNX Runtime."""
    seconds = epochs * (10 * per_class * cost["train_s_per_image"] + 10 * val_per_class * cost["eval_eager_s_per_image"])
    return (seconds + test * cost["eval_auto_s_per_image"]) / 60


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="data/fashion-mnist")
    ap.add_argument("--crops", type=int, nargs="+", default=[96, 128, 160, 224])
    ap.add_argument("--per-class", type=int, default=200, help="train (and test) images per class for the image-size sweep")
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 300, 1000, 3000, 0], help="train images per class; 0 for all")
    ap.add_argument("--skip", nargs="*", default=[], choices=["crops", "sizes", "finetune"])
    ap.add_argument("--out", default="bench/results/tradeoff.json")
    args = ap.parse_args()
    data = Path(args.data)
    result: dict = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"}
    with tempfile.TemporaryDirectory(prefix="tradeoff-") as tmp:
        if "crops" not in args.skip:
            print("image size:", flush=True)
            result["crops"] = image_sizes(data, args.crops, args.per_class, Path(tmp))
        if "sizes" not in args.skip:
            print("train-set size (224 px caches):", flush=True)
            result["sizes"] = train_sizes(data, args.sizes)
        if "finetune" not in args.skip:
            print("fine-tune cost:", flush=True)
            result["finetune"] = finetune_cost(data, Path(tmp))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))

    if "crops" in result:
        print("\n| crop | extraction img/s | logreg test | svm-rbf test |\n|---|---|---|---|")
        for r in result["crops"]:
            print(f"| {r['crop']} | {r['images_per_s']:.0f} | {100 * r['logreg']['test']:.1f} % | {100 * r['svm-rbf']['test']:.1f} % |")
    if "sizes" in result:
        print("\n| train images per class | rows | logreg test | fit | svm-rbf test | fit |\n|---|---|---|---|---|---|")
        for r in result["sizes"]:
            print(f"| {r['per_class']} | {r['rows']:,} | {100 * r['logreg']['test']:.1f} % | {r['logreg']['fit_s']:.1f} s | "
                  f"{100 * r['svm-rbf']['test']:.1f} % | {r['svm-rbf']['fit_s']:.1f} s |")
    if "finetune" in result:
        f = result["finetune"]
        print(f"\nfine-tune: {f['train_s_per_image'] * 1000:.0f} ms per train image, evaluation {f['eval_eager_s_per_image'] * 1000:.0f} ms "
              f"per image eager, {f['eval_auto_s_per_image'] * 1000:.0f} ms with ONNX Runtime")
        print("\n| fine-tune images per class | make all fine-tune (3 epochs, val 50/class, 10k test) |\n|---|---|")
        for n in (50, 100, 200, 500, 5400):
            print(f"| {n} | {make_all_minutes(f, n):.1f} min |")


if __name__ == "__main__":
    main()
