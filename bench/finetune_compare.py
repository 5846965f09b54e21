"""Cached heads against fine-tuning on the same subset: best cached head, head-only fine-tuning, full fine-tuning
from a random head, and LP-FT (full fine-tuning from the fitted linear head), with test accuracy and wall time.

A class-balanced subset of the dataset (train / val / test, as symlinks) keeps the CPU run to about ten minutes;
every method trains on the same train images, selects on the same val images and is scored on the same test images.

`--digits` runs the same comparison on a second, small dataset: scikit-learn's packaged 8x8 handwritten digits
(1,797 images, upscaled like Fashion-MNIST), split 42 / 18 / 40 % into train, val and test (stratified, seed 0).

Usage: python bench/finetune_compare.py [--train 50] [--val 30] [--test 100] [--epochs 2] [--head-epochs 3] [--digits]
       [--size 160]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path


from pipeline import ExtractConfig, extract
from pipeline.data import DatasetSpec, load_split
from pipeline.evaluate import evaluate
from pipeline.finetune import FinetuneConfig, finetune
from pipeline.fit import HeadConfig, fit_head
from results import save  # bench/ is on sys.path when a script of it runs

BACKBONE = {"model": "mobilenet_v2", "weights": "IMAGENET1K_V1"}
CACHED_HEADS = ("linear", "logreg", "svm", "knn", "tree")


def make_subset(data: Path, out: Path, per_class: dict[str, int], seed: int = 0) -> Path:
    """Symlink a class-balanced subset: train and val from the train split (disjoint), test from the test split."""
    import numpy as np

    rng = np.random.default_rng(seed)
    for split, source in (("train", "train"), ("test", "test")):
        s = load_split(DatasetSpec(str(data)), source)
        for c in range(len(s.classes)):
            members = rng.permutation(np.flatnonzero(s.labels == c))
            parts = {"train": members[: per_class["train"]], "val": members[per_class["train"] : per_class["train"] + per_class["val"]]} \
                if split == "train" else {"test": members[: per_class["test"]]}
            for name, idx in parts.items():
                for i in idx:
                    dst = out / name / s.classes[c] / Path(s.paths[i]).name
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    os.symlink((data / s.paths[i]).resolve(), dst)
    return out


def make_digits(out: Path, seed: int = 0) -> Path:
    """scikit-learn's 8x8 digits as an image folder, grey levels 0-16 stretched to 0-255: train, val and test."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    pixels = (d.images * (255 / 16)).round().astype(np.uint8)
    rest, test = train_test_split(np.arange(len(pixels)), test_size=0.4, stratify=d.target, random_state=seed)
    train, val = train_test_split(rest, test_size=0.3, stratify=d.target[rest], random_state=seed)
    for split, idx in (("train", train), ("val", val), ("test", test)):
        for i in idx:
            dst = out / split / str(d.target[i]) / f"{i:04d}.png"
            dst.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels[i]).save(dst)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="data/fashion-mnist")
    ap.add_argument("--train", type=int, default=50, help="train images per class")
    ap.add_argument("--val", type=int, default=30, help="val images per class (from train)")
    ap.add_argument("--test", type=int, default=100, help="test images per class")
    ap.add_argument("--epochs", type=int, default=2, help="epochs of full fine-tuning and LP-FT")
    ap.add_argument("--head-epochs", type=int, default=3, help="epochs of head-only fine-tuning")
    ap.add_argument("--digits", action="store_true", help="scikit-learn's digits instead of a Fashion-MNIST subset")
    ap.add_argument("--size", type=int, default=None, help="resize and crop, px  [default: the weights' 256 and 224]")
    ap.add_argument("--out", default=None, help="[default: bench/results/finetune.json, or finetune-digits.json]")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="pipeline-ft-") as tmp:
        tmp = Path(tmp)
        if args.digits:
            data = make_digits(tmp / "digits")
        else:
            data = make_subset(Path(args.data), tmp / "fmnist-subset", {"train": args.train, "val": args.val, "test": args.test})
        size = {"resize": args.size, "crop": args.size} if args.size else {}
        source = ExtractConfig(data=str(data), cache_dir=str(tmp / "features"), **BACKBONE, **size)

        t0 = time.perf_counter()
        for split in ("train", "val", "test"):
            extract(replace(source, split=split), progress=False)
        t_extract = time.perf_counter() - t0
        heads = {}
        for clf in CACHED_HEADS:
            r = fit_head(HeadConfig(clf=clf), source)
            m = evaluate(r.path)
            heads[clf] = {"val": r.val_accuracy, "test": m["top1"], "fit_s": r.fit_seconds, "path": str(r.path)}
            print(f"cached {clf:<8} val {r.val_accuracy:.4f} test {m['top1']:.4f} fit {r.fit_seconds:.1f} s", flush=True)
        best = max(heads, key=lambda k: heads[k]["val"])  # chosen on val, like everything else
        rows.append({"method": f"best cached head ({best}, chosen on val)", "test_top1": heads[best]["test"],
                     "seconds": t_extract + heads[best]["fit_s"], "note": f"extraction {t_extract:.0f} s + fit {heads[best]['fit_s']:.1f} s"})

        common = {"data": str(data), **BACKBONE, **size, "output_dir": str(tmp / "runs"), "workers": 0}
        runs = [
            ("head-only fine-tuning", {"freeze": "backbone", "epochs": args.head_epochs, "name": "head-only"}),
            ("full fine-tuning, random head", {"freeze": "none", "epochs": args.epochs, "name": "full"}),
            ("LP-FT (full, from the linear head)", {"freeze": "none", "epochs": args.epochs, "name": "lp-ft", "init_head": heads["linear"]["path"]}),
        ]
        for label, kw in runs:
            t0 = time.perf_counter()
            result = finetune(FinetuneConfig(**common, **kw), progress=False)
            seconds = time.perf_counter() - t0
            m = evaluate(result.path)
            rows.append({"method": label, "test_top1": m["top1"], "seconds": seconds, "val": result.val_accuracy,
                         "note": f"{kw['epochs']} epochs, best epoch {result.best_epoch}"})
            print(f"{label:<36} val {result.val_accuracy:.4f} test {m['top1']:.4f} in {seconds:.0f} s", flush=True)
    save(args.out or f"bench/results/finetune{'-digits' if args.digits else ''}.json", {**vars(args), "cached_heads": heads}, rows)
    what = "scikit-learn's digits, 42 / 18 / 40 % train, val, test" if args.digits else \
        f"Subset: {args.train} train, {args.val} val, {args.test} test images per class"
    print(f"\n{what}; MobileNetV2 IMAGENET1K_V1, {args.size or 224} px.\n")
    print("| method | test top-1 | wall time | notes |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['test_top1']:.2%} | {r['seconds']:.0f} s | {r['note']} |")


if __name__ == "__main__":
    main()
