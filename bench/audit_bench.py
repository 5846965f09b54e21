"""The audit measured on Fashion-MNIST through the real MobileNetV2 (ImageNet weights): planted label flips, planted copies, the whole set.

0. A stratified subset of the Fashion-MNIST image folder (``--per-class`` train images per class, a fifth of that
   for val and for test, drawn with ``--seed``) is linked into ``WORK/subset`` and extracted like the embedded default
   (224 px, the classifier's input, ONNX Runtime on the CPU).
1. Label flips. The subset's train and val caches are copied with 3 % of their labels changed to another class at
   random (and once unchanged, for the natural baseline). ``audit()`` runs on each copy with its defaults (the
   logreg head, its C chosen on the flipped val, 5 folds). Reported: the fraction of flipped images in the top
   2 x (number of flips) of ``label_issues.csv``, the precision at that cut and at 1 x, and cleanlab's flagged set.
2. Near-duplicates. ``--copies`` val images (for calibration) and as many test images (for evaluation) are resized
   to a random size of 20 to 40 px (bicubic) and re-encoded as JPEG of quality 50 to 90, and extracted with the same
   backbone: real image copies through the real extractor, not feature perturbations. The duplicate search then
   runs over train + copies, val and test at a low threshold; for each threshold of a grid it reports the copies
   found (their pair with the original above the threshold) and the unplanted pairs above it, within and across
   splits, for each ``--dims`` setting.
3. The embedded default (``--full FOLDER`` of train.h5, val.h5 and test.h5): ``audit()`` on the full caches, timed,
   written under ``WORK`` (the caches' folder is left alone).

Usage: python bench/audit_bench.py --data data/fashion-mnist --work /tmp/audit-bench [--per-class 1000] [--copies 300]
           [--full features/fashion-mnist/mobilenet_v2-IMAGENET1K_V1/classifier-input] [--skip-subset]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image
from threadpoolctl import threadpool_limits

from pipeline import layout
from pipeline.audit import audit
from pipeline.cache import read_cache, write_features
from pipeline.config import AuditConfig, ExtractConfig
from pipeline.data import stratified_subset
from pipeline.duplicates import project, search
from pipeline.extract import extract


def subset(data: Path, work: Path, per_class: int, seed: int) -> tuple[Path, dict]:
    """Link a stratified subset of an image folder into ``work/subset`` (train, val from train, test) and extract it."""
    from pipeline.config import DatasetSpec
    from pipeline.data import load_split

    root = work / "subset"
    shutil.rmtree(root, ignore_errors=True)
    train, test = (load_split(DatasetSpec(root=str(data)), s) for s in ("train", "test"))
    rows = stratified_subset(train.labels, per_class + per_class // 5, seed)
    rng = np.random.default_rng(seed)
    is_val = np.zeros(len(rows), dtype=bool)
    for c in np.unique(train.labels[rows]):
        mine = np.flatnonzero(train.labels[rows] == c)
        is_val[rng.choice(mine, per_class // 5, replace=False)] = True
    links = [(train.paths[i], "val" if v else "train") for i, v in zip(rows, is_val)]
    links += [(test.paths[i], "test") for i in stratified_subset(test.labels, per_class // 5, seed)]
    for rel, split in links:
        dst = root / split / Path(rel).relative_to(Path(rel).parts[0])
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.symlink_to((data / rel).resolve())
    timings = {}
    for split in ("train", "val", "test"):
        t0 = time.perf_counter()
        result = extract(ExtractConfig(data=str(root), split=split, model="mobilenet_v2", weights="IMAGENET1K_V1",
                                       cache_dir=str(work / "features")), progress=False)
        timings[split] = {"images": result.n_images, "seconds": round(time.perf_counter() - t0, 1), "engine": result.engine}
        print(f"extracted {split}: {timings[split]}")
    return result.path.parent, timings


def flips(features: Path, work: Path, rate: float, seed: int) -> dict:
    """Audit the train and val caches with ``rate`` of their labels flipped, and without flips."""
    rng = np.random.default_rng(seed)
    out: dict = {}
    parts = {}
    for split in ("train", "val"):
        with read_cache(features / f"{split}.h5") as c:
            parts[split] = (c.features(), c.labels, c.paths, c.classes, c.attrs)
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


# How a planted copy is made from its original (a 28 x 28 grayscale PNG).
COPIES = {
    "resize+jpeg": "resized to 20-40 px (bicubic), then JPEG of quality 50-90",
    "jpeg": "JPEG of quality 75-95 at the original size",
    "resize": "resized to 24-36 px (bicubic), saved losslessly (PNG)",
}


def _copy(src: Path, dst: Path, rng: np.random.Generator, kind: str) -> Path:
    """A copy of ``src`` made as ``COPIES[kind]`` says, written at ``dst`` (its suffix set by the format)."""
    with Image.open(src) as im:
        im = im.convert("L")
        if kind in ("resize+jpeg", "resize"):
            size = int(rng.integers(20, 41)) if kind == "resize+jpeg" else int(rng.integers(24, 37))
            im = im.resize((size, size), Image.BICUBIC)
        if kind == "resize":
            dst = dst.with_suffix(".png")
            im.save(dst, "PNG")
        else:
            dst = dst.with_suffix(".jpg")
            im.save(dst, "JPEG", quality=int(rng.integers(50, 91)) if kind == "resize+jpeg" else int(rng.integers(75, 96)))
    return dst


def duplicates(features: Path, work: Path, copies: int, dims_list: list[int], seed: int, kind: str) -> dict:
    """Planted copies of val and test images (made as ``COPIES[kind]``) beside train: found fraction and unplanted pairs by threshold."""
    rng = np.random.default_rng(seed)
    planted = work / ("planted" if kind == "resize+jpeg" else f"planted-{kind}")
    shutil.rmtree(planted, ignore_errors=True)
    originals = {}
    for split in ("val", "test"):
        with read_cache(features / f"{split}.h5") as c:
            pick = np.sort(rng.choice(len(c), copies, replace=False))
            originals[split] = (pick, [c.paths[i] for i in pick], c.labels[pick], c.classes, c.attrs.get("data_root"))
    names = []
    for split, (pick, paths, labels, classes, root) in originals.items():
        for i, p, y in zip(pick, paths, labels):
            dst = planted / "test" / classes[y] / f"{split}-{i:05d}"
            dst.parent.mkdir(parents=True, exist_ok=True)
            _copy(Path(root) / p, dst, rng, kind)
            names.append((split, int(i)))
    with read_cache(features / "train.h5") as c:
        attrs = c.attrs
    settings = attrs.get("settings", {})
    t0 = time.perf_counter()
    result = extract(ExtractConfig(data=str(planted), split="test", model=settings["model"], weights=settings["weights"],
                                   cache_dir=str(work / "features"), workers=0), force=True, progress=False)
    extract_s = time.perf_counter() - t0
    with read_cache(result.path) as c:
        copy_paths = c.paths  # "test/<class>/<split>-<row>.jpg", sorted by the extractor
    copy_of = [(Path(p).stem.split("-")[0], int(Path(p).stem.split("-")[1])) for p in copy_paths]

    out: dict = {"made": COPIES[kind], "copies": {"val": copies, "test": copies}, "extract_seconds": round(extract_s, 1), "by_dims": {}}
    grid = [round(t, 2) for t in np.arange(0.80, 0.996, 0.01)]
    for dims in dims_list:
        import h5py

        with h5py.File(features / "train.h5") as ft, h5py.File(result.path) as fc, h5py.File(features / "val.h5") as fv, \
                h5py.File(features / "test.h5") as fs:
            tap = lambda f: f["features"][next(iter(f["features"]))]  # noqa: E731
            sets = [tap(ft), tap(fc), tap(fv), tap(fs)]
            n_train, n_copy, n_val = (len(d) for d in sets[:3])
            t0 = time.perf_counter()
            with threadpool_limits(1):  # as audit() does
                Z = project(sets, work / f"projected-{dims}.npy", dims=dims, seed=seed)
            found = search(Z, grid[0], 10, block_rows=4096, log=print)
            seconds = time.perf_counter() - t0
        if dims == dims_list[0]:
            local = _local_scaling(Z, found.knn, n_train, n_copy, n_val, copy_of)
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
    out["local_scaling"] = local
    print(json.dumps({"local_scaling": local}, indent=1))
    return out


def _local_scaling(Z: np.ndarray, knn: np.ndarray, n_train: int, n_copy: int, n_val: int, copy_of: list) -> list[dict]:
    """A diagnostic, not what the audit does: the pair score ``s - (r_a + r_b) / 2`` (``r``: an image's mean similarity to
    its 10 nearest neighbours, as in CSLS), by margin: copies found and unplanted pairs (not touching a copy) above it."""
    import torch

    r = torch.from_numpy(knn.mean(axis=1))
    margins = [0.0, 0.02, 0.04, 0.06, 0.08, 0.10, 0.12, 0.15]
    start = {"val": n_train + n_copy, "test": n_train + n_copy + n_val}
    originals = torch.tensor([start[s] + i for s, i in copy_of])
    Zt = torch.from_numpy(np.asarray(Z))
    copies = torch.arange(n_train, n_train + n_copy)
    m_copy = (Zt[copies] * Zt[originals]).sum(1) - (r[copies] + r[originals]) / 2
    keep = torch.ones(len(Zt), dtype=torch.bool)
    keep[n_train:n_train + n_copy] = False
    X, rk = Zt[keep], r[keep]
    counts = torch.zeros(len(margins), dtype=torch.long)
    block = 4096
    with torch.inference_mode():
        for i0 in range(0, len(X), block):
            for j0 in range(i0, len(X), block):
                M = X[i0:i0 + block] @ X[j0:j0 + block].T - (rk[i0:i0 + block, None] + rk[None, j0:j0 + block]) / 2
                if i0 == j0:
                    M = M.triu(1) + torch.tril(torch.full_like(M, -9.0))
                counts += torch.stack([(M >= m).sum() for m in margins])
    return [{"margin": m, "found_copies": float((m_copy >= m).float().mean()), "unplanted_pairs": int(c)} for m, c in zip(margins, counts)]


def full(features: Path, work: Path) -> dict:
    """The whole audit on the embedded default's caches, written to ``work`` (the caches' folder is left alone)."""
    t0 = time.perf_counter()
    result = audit(AuditConfig(train_cache=str(features / "train.h5"), val_cache=str(features / "val.h5"),
                               test_cache=str(features / "test.h5"), output=str(work / "audit")), progress=False, log=print)
    s = result.summary
    return {"seconds": round(time.perf_counter() - t0, 1), "summary": {k: s[k] for k in (
        "images", "label_issues", "noise_rate", "duplicates", "leaked_test_images", "unhashed_images", "outliers", "head", "seconds")},
        "heads_beside_caches": sorted(p.name for p in layout.heads_dir(features / "train.h5").glob("*.json"))}


def synthetic_full(data: Path, work: Path, seed: int, spread: float = 2.7) -> dict:
    """The embedded default's shape without its caches: every image path of ``data`` (so the hashing is real), with
    synthetic 1,280-wide features of class structure (ReLU of a low-rank mixture, as in bench/heads_bench.py); the
    whole audit timed, the head's sweep on val included. ``spread`` (the within-class variation) puts the logreg head
    near its accuracy on the real features (about 88 %), so that its fits take as long to converge."""
    from pipeline.config import DatasetSpec
    from pipeline.data import load_split

    rng = np.random.default_rng(seed)
    latent, dims = 64, 1280
    means = rng.normal(0, 1.0, (10, latent))
    mixing = rng.normal(0, 1 / np.sqrt(latent), (dims, latent))
    caches = {}
    shutil.rmtree(work / "synthetic", ignore_errors=True)  # no head or audit of an earlier run is reused
    for split in ("train", "val", "test"):
        s = load_split(DatasetSpec(root=str(data)), split)
        z = means[s.labels] + rng.normal(0, spread, (len(s), latent))
        X = np.maximum(z @ mixing.T + rng.normal(0, 0.5, (len(s), dims)) - 0.3, 0).astype(np.float32)
        settings = {"model": "synthetic", "weights": "none", "taps": ["features:output"], "preprocess": {}, "split": split,
                    "data_root": str(data.resolve())}
        caches[split] = write_features(work / "synthetic" / f"{split}.h5", X, s.labels, s.classes, settings, paths=s.paths)
        del X, z
    t0 = time.perf_counter()
    result = audit(AuditConfig(**{f"{k}_cache": str(v) for k, v in caches.items()}), force=True, progress=False, log=print)
    s = result.summary
    return {"seconds": round(time.perf_counter() - t0, 1), "spread": spread, "images": s["images"], "parts": s["seconds"], "head": s["head"],
            "pairs": s["duplicates"], "label_issues": s["label_issues"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("data/fashion-mnist"), help="The Fashion-MNIST image folder.")
    ap.add_argument("--work", type=Path, default=Path("/tmp/audit-bench"))
    ap.add_argument("--per-class", type=int, default=1000, help="Train images per class of the subset (val and test: a fifth).")
    ap.add_argument("--rate", type=float, default=0.03, help="Fraction of train and val labels flipped.")
    ap.add_argument("--copies", type=int, default=300, help="Planted copies of val images, and as many of test images.")
    ap.add_argument("--dims", default="256,0", help="Comma-separated PCA sizes of the duplicate search to compare (0: all).")
    ap.add_argument("--copy-kinds", default=",".join(COPIES), help=f"Comma-separated kinds of planted copies: {', '.join(COPIES)}.")
    ap.add_argument("--skip-flips", action="store_true", help="Leave out the label flips (their results are kept from an earlier run).")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--full", type=Path, help="Also audit these full caches (a folder of train.h5, val.h5, test.h5).")
    ap.add_argument("--skip-subset", action="store_true", help="Only the full audit.")
    ap.add_argument("--synthetic-full", action="store_true", help="Time the audit on synthetic features of the embedded default's "
                    "shape over the real image paths of --data (when its caches are not at hand).")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    out = args.work / "results.json"
    results = json.loads(out.read_text()) if out.is_file() else {}
    results["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), "load_average_at_start": os.getloadavg()}
    if not args.skip_subset:
        features, results["extract"] = subset(args.data, args.work, args.per_class, args.seed)
        if not args.skip_flips:
            results["flips"] = flips(features, args.work, args.rate, args.seed)
        dups = results.setdefault("duplicates", {})
        for kind in args.copy_kinds.split(","):
            dims = [int(d) for d in args.dims.split(",")]
            new = duplicates(features, args.work, args.copies, dims, args.seed, kind)
            dups[kind] = {**new, "by_dims": {**dups.get(kind, {}).get("by_dims", {}), **new["by_dims"]}}  # earlier --dims kept
    if args.synthetic_full:
        results["synthetic_full"] = synthetic_full(args.data, args.work, args.seed)
        print(json.dumps(results["synthetic_full"], indent=1))
    if args.full:
        results["full"] = full(args.full, args.work)
        print(json.dumps(results["full"], indent=1))
    out.write_text(json.dumps(results, indent=1))
    print(f"results -> {out}")


if __name__ == "__main__":
    main()
