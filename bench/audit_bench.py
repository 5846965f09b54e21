"""The audit measured on Fashion-MNIST's cached MobileNetV2 features: planted label flips, planted copies, the whole set.

1. Label flips. A stratified subset of the train and val caches is copied with 3 % of its labels changed to another
   class at random (and once unchanged, for the natural baseline). ``audit()`` runs on each copy with its defaults
   (the logreg head, its C chosen on the flipped val, 5 folds). Reported: the fraction of flipped images in the top
   2 x (number of flips) of ``label_issues.csv``, the precision at that cut and at 1 x, and cleanlab's flagged set.
2. Near-duplicates. Images of val (for calibration) and of test (for evaluation) are resized to a random size of
   20 to 40 px (bicubic) and re-encoded as JPEG of quality 50 to 90, placed beside train, and extracted with the same
   backbone (real images through the real extractor, not feature perturbations). The duplicate search then runs
   over train + copies, val and test at a low threshold; for each threshold of a grid it reports the copies found
   (the pair copy-original above the threshold) and the unplanted pairs above it, within and across splits.
3. The embedded default. ``audit()`` on the full train, val and test caches, timed, written to another folder.

Usage: python bench/audit_bench.py --features /tmp/e2e/features/fashion-mnist/mobilenet_v2-IMAGENET1K_V1/classifier-input
           --data /tmp/e2e/data/fashion-mnist --work /tmp/audit-bench [--per-class 1000] [--copies 300] [--skip-full]
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline import layout
from pipeline.audit import audit
from pipeline.cache import read_cache, write_features
from pipeline.config import AuditConfig, ExtractConfig
from pipeline.data import stratified_subset
from pipeline.duplicates import project, search
from pipeline.extract import extract


def flips(features: Path, work: Path, per_class: int, rate: float, seed: int) -> dict:
    """Audit a subset of train+val with ``rate`` of its labels flipped, and without flips."""
    rng = np.random.default_rng(seed)
    out: dict = {}
    parts = {}
    for split, n in (("train", per_class), ("val", max(1, per_class // 5))):
        with read_cache(features / f"{split}.h5") as c:
            rows = stratified_subset(c.labels, n, seed)
            parts[split] = (c.features()[rows], c.labels[rows], [c.paths[i] for i in rows], c.classes, c.attrs)
    for name, r in (("clean", 0.0), ("flipped", rate)):
        folder = work / f"flips-{name}"
        shutil.rmtree(folder, ignore_errors=True)
        flipped: set[tuple[str, str]] = set()
        caches = {}
        for split, (X, y, paths, classes, attrs) in parts.items():
            y = y.copy()
            pick = rng.choice(len(y), int(round(r * len(y))), replace=False)
            y[pick] = (y[pick] + rng.integers(1, len(classes), len(pick))) % len(classes)
            flipped |= {(split, paths[i]) for i in pick}
            settings = {**attrs.get("settings", {}), "split": split, "data_root": attrs.get("data_root")}
            caches[split] = write_features(folder / f"{split}.h5", X, y, classes, settings, tap=attrs["taps"][0], paths=paths)
        t0 = time.perf_counter()
        result = audit(AuditConfig(train_cache=str(caches["train"]), val_cache=str(caches["val"]), test_cache=None), progress=False, log=print)
        seconds = time.perf_counter() - t0
        with open(result.files.label_issues, newline="") as f:
            ranked = [(row["split"], row["path"]) for row in csv.DictReader(f)]
        s = result.summary
        entry = {"images": len(ranked), "flips": len(flipped), "flagged": s["label_issues"], "noise_rate": s["noise_rate"],
                 "head": s["head"], "seconds": round(seconds, 1)}
        if flipped:
            for cut in (len(flipped), 2 * len(flipped)):
                found = sum(x in flipped for x in ranked[:cut])
                entry[f"top_{cut}"] = {"recall": found / len(flipped), "precision": found / cut}
            hit = sum(x in flipped for x in ranked[:s["label_issues"]])
            entry["flagged_set"] = {"recall": hit / len(flipped), "precision": hit / max(1, s["label_issues"])}
        out[name] = entry
        print(json.dumps({name: entry}, indent=1))
    return out


def _copy(src: Path, dst: Path, rng: np.random.Generator) -> None:
    """A resized, re-encoded copy: a random size of 20-40 px (bicubic), JPEG of random quality 50-90."""
    with Image.open(src) as im:
        size = int(rng.integers(20, 41))
        im.convert("L").resize((size, size), Image.BICUBIC).save(dst, "JPEG", quality=int(rng.integers(50, 91)))


def duplicates(features: Path, data: Path, work: Path, copies: int, dims_list: list[int], seed: int) -> dict:
    """Planted resized, re-encoded copies of val and test images in train: found fraction and unplanted pairs by threshold."""
    rng = np.random.default_rng(seed)
    planted = work / "planted"
    shutil.rmtree(planted, ignore_errors=True)
    originals = {}
    for split in ("val", "test"):
        with read_cache(features / f"{split}.h5") as c:
            pick = np.sort(rng.choice(len(c), copies, replace=False))
            originals[split] = (pick, [c.paths[i] for i in pick], c.labels[pick], c.classes, c.attrs.get("data_root"))
    names = []
    for split, (pick, paths, labels, classes, root) in originals.items():
        for i, p, y in zip(pick, paths, labels):
            dst = planted / "test" / classes[y] / f"{split}-{i:05d}.jpg"
            dst.parent.mkdir(parents=True, exist_ok=True)
            _copy(Path(root) / p, dst, rng)
            names.append((split, int(i)))
    with read_cache(features / "train.h5") as c:
        attrs = c.attrs
    settings = attrs.get("settings", {})
    t0 = time.perf_counter()
    result = extract(ExtractConfig(data=str(planted), split="test", model=settings["model"], weights=settings["weights"],
                                   cache_dir=str(work / "features"), workers=0), progress=False)
    extract_s = time.perf_counter() - t0
    with read_cache(result.path) as c:
        copy_paths = c.paths  # "test/<class>/<split>-<row>.jpg", sorted by the extractor
    copy_of = [(Path(p).stem.split("-")[0], int(Path(p).stem.split("-")[1])) for p in copy_paths]

    out: dict = {"copies": {"val": copies, "test": copies}, "extract_seconds": round(extract_s, 1), "by_dims": {}}
    grid = [round(t, 2) for t in np.arange(0.80, 0.996, 0.01)]
    for dims in dims_list:
        import h5py

        with h5py.File(features / "train.h5") as ft, h5py.File(result.path) as fc, h5py.File(features / "val.h5") as fv, \
                h5py.File(features / "test.h5") as fs:
            tap = lambda f: f["features"][next(iter(f["features"]))]  # noqa: E731
            sets = [tap(ft), tap(fc), tap(fv), tap(fs)]
            n_train, n_copy, n_val = (len(d) for d in sets[:3])
            t0 = time.perf_counter()
            Z = project(sets, work / f"projected-{dims}.npy", dims=dims, seed=seed)
            found = search(Z, grid[0], 10, block_rows=4096, log=print)
            seconds = time.perf_counter() - t0
        del Z
        (work / f"projected-{dims}.npy").unlink()
        start = {"copy": n_train, "val": n_train + n_copy, "test": n_train + n_copy + n_val}
        planted_pair = {(start["copy"] + k, start[s] + i) for k, (s, i) in enumerate(copy_of)}
        a, b, sim = found.a, found.b, found.similarity
        is_planted = np.asarray([(int(x), int(y)) in planted_pair for x, y in zip(a, b)], dtype=bool)
        touches_copy = ((a >= start["copy"]) & (a < start["val"])) | ((b >= start["copy"]) & (b < start["val"]))
        region = np.searchsorted([start["copy"], start["val"], start["test"]], np.stack([a, b]), side="right")  # 0 train, 1 copy, 2 val, 3 test
        other = ~touches_copy
        cross = other & (region[0] != region[1])
        planted_sim = {(s, i): None for s, i in copy_of}
        for x, y, v in zip(a[is_planted], b[is_planted], sim[is_planted]):
            planted_sim[copy_of[int(x) - start["copy"]]] = float(v)
        curve = []
        for t in grid:
            rec = {s: float(np.mean([(v or 0) >= t for (ss, _), v in planted_sim.items() if ss == s])) for s in ("val", "test")}
            above = sim >= t
            curve.append({"threshold": t, "found_val_copies": rec["val"], "found_test_copies": rec["test"],
                          "unplanted_pairs": int((above & other).sum()), "unplanted_cross_split": int((above & cross).sum())})
        sims = np.asarray([v if v is not None else -1 for v in planted_sim.values()])
        # When pairs were dropped (the most similar kept), the counts hold only above the lowest similarity kept.
        out["by_dims"][str(dims)] = {"search_seconds": round(seconds, 1), "truncated": found.truncated,
                                     "lowest_kept_similarity": float(sim.min()) if len(sim) else None, "curve": curve,
                                     "copy_similarity_quantiles": {q: float(np.quantile(sims, q / 100)) for q in (1, 5, 10, 50)}}
        print(json.dumps({dims: out["by_dims"][str(dims)]}, indent=1))
        # The unplanted pairs closest to the default threshold, to look at.
        keep = np.flatnonzero(other & (sim >= AuditConfig().threshold))[:40]
        out["by_dims"][str(dims)]["unplanted_examples"] = [[int(a[k]), int(b[k]), float(sim[k])] for k in keep]
    return out


def full(features: Path, work: Path) -> dict:
    """The whole audit on the embedded default's caches, written to ``work`` (the caches' folder is left alone)."""
    t0 = time.perf_counter()
    result = audit(AuditConfig(train_cache=str(features / "train.h5"), val_cache=str(features / "val.h5"),
                               test_cache=str(features / "test.h5"), output=str(work / "audit")), progress=False, log=print)
    s = result.summary
    return {"seconds": round(time.perf_counter() - t0, 1), "summary": {k: s[k] for k in (
        "images", "label_issues", "noise_rate", "duplicates", "leaked_test_images", "unhashed_images", "outliers", "head", "seconds")},
        "heads_beside_caches": sorted(p.name for p in layout.heads_dir(features / "train.h5").glob("*.json"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", type=Path, required=True, help="Folder with train.h5, val.h5 and test.h5.")
    ap.add_argument("--data", type=Path, required=True, help="The image folder the caches were made from.")
    ap.add_argument("--work", type=Path, default=Path("/tmp/audit-bench"))
    ap.add_argument("--per-class", type=int, default=1000, help="Train images per class of the flip subset (val: a fifth).")
    ap.add_argument("--rate", type=float, default=0.03)
    ap.add_argument("--copies", type=int, default=300, help="Planted copies of val images, and as many of test images.")
    ap.add_argument("--dims", default="256,0", help="Comma-separated PCA sizes of the duplicate search to compare (0: all).")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-full", action="store_true")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    results = {"machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version()}}
    t0 = time.perf_counter()
    results["flips"] = flips(args.features, args.work, args.per_class, args.rate, args.seed)
    results["duplicates"] = duplicates(args.features, args.data, args.work, args.copies, [int(d) for d in args.dims.split(",")], args.seed)
    if not args.skip_full:
        results["full"] = full(args.features, args.work)
        print(json.dumps(results["full"], indent=1))
    results["seconds"] = round(time.perf_counter() - t0, 1)
    (args.work / "results.json").write_text(json.dumps(results, indent=1))
    print(f"results -> {args.work / 'results.json'}")


if __name__ == "__main__":
    main()
