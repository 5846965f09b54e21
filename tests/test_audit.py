"""The audit: planted label flips, near-duplicates, exact copies and an outlier are found on generated features; its
files have the columns other tools read; it is reused; fit-head acts on it; the command and the report section work end
to end on a tiny image folder.
"""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline import ExtractConfig, extract, layout
from pipeline.audit import DUPLICATE_COLUMNS, LABEL_COLUMNS, OUTLIER_COLUMNS, audit, leaked_test_paths, suspects
from pipeline.cache import read_cache, write_features
from pipeline.cli import cli
from pipeline.config import AuditConfig, HeadConfig
from pipeline.fit import fit_head
from pipeline.report import ReportConfig, build_report, check_render, find_chromium

from .conftest import make_image_folder, single_threaded, tiny

K, D = 4, 32


def _rows(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Caches of 4 Gaussian classes with 3 % of train and val labels flipped, test images copied into train (4 perturbed
    copies, 1 exact file copy), a near pair within train, and one outlier; every row has a small file under data_root."""
    root = tmp_path_factory.mktemp("audit")
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(K, D)) * 2.0
    classes = [f"c{i}" for i in range(K)]

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.repeat(np.arange(K), n // K)
        return (centres[y] + rng.normal(size=(len(y), D))).astype(np.float32), y

    X = {s: draw(n) for s, n in (("train", 400), ("val", 100), ("test", 100))}
    (Xt, yt), (Xv, yv), (Xs, ys) = X["train"], X["val"], X["test"]
    copies = [3, 30, 57, 81]  # test rows copied into train, slightly perturbed (a resized, re-encoded copy)
    Xt = np.concatenate([Xt, Xs[copies] + rng.normal(size=(len(copies), D)).astype(np.float32) * 0.02, Xs[[90]]])
    yt = np.concatenate([yt, ys[copies], ys[[90]]])
    Xt[11] = Xt[10] + rng.normal(size=D).astype(np.float32) * 0.02  # a near pair within train
    Xt[7] = centres[0] + 25 * rng.normal(size=D) / np.sqrt(D)  # far from everything
    flips = {"train": rng.choice(np.arange(20, 400), 12, replace=False), "val": rng.choice(100, 3, replace=False)}
    given = {"train": yt.copy(), "val": yv.copy(), "test": ys}
    for split, rows in flips.items():
        given[split][rows] = (given[split][rows] + rng.integers(1, K, len(rows))) % K
    data = root / "images"
    caches = {}
    for split, feats in (("train", Xt), ("val", Xv), ("test", Xs)):
        paths = [f"{split}/{classes[c]}/{i:03d}.bin" for i, c in enumerate(given[split])]
        for i, p in enumerate(paths):
            (data / p).parent.mkdir(parents=True, exist_ok=True)
            (data / p).write_bytes(f"{split} {i}".encode())
        settings = {"model": "mobilenet_v2", "weights": "none", "taps": ["features:output"], "preprocess": {}, "dataset": "blobs",
                    "split": split, "data_root": str(data)}
        caches[split] = write_features(root / "features" / f"{split}.h5", feats, given[split], classes, settings, paths=paths)
    exact = (f"train/{classes[yt[-1]]}/{len(Xt) - 1:03d}.bin", f"test/{classes[ys[90]]}/090.bin")
    (data / exact[0]).write_bytes((data / exact[1]).read_bytes())
    config = AuditConfig(value=1.0, train_cache=str(caches["train"]), val_cache=str(caches["val"]), test_cache=str(caches["test"]),
                         block_rows=128)
    with single_threaded():
        result = audit(config, progress=False)
    return SimpleNamespace(root=root, caches=caches, config=config, result=result, flips=flips, copies=copies, exact=exact,
                           classes=classes, true={"train": yt, "val": yv}, n_train=len(Xt))


def test_planted_label_flips_rank_first_with_their_true_label_suggested(planted: SimpleNamespace) -> None:
    header, rows = _rows(planted.result.files.label_issues)
    assert tuple(header) == LABEL_COLUMNS
    assert len(rows) == planted.n_train + 100 and {r["split"] for r in rows} == {"train", "val"}  # every train and val image
    n_flips = sum(len(v) for v in planted.flips.values())
    top = {(r["split"], int(Path(r["path"]).stem)) for r in rows[:2 * n_flips]}
    assert {(s, int(i)) for s, rows_ in planted.flips.items() for i in rows_} <= top
    for r in rows[:2 * n_flips]:
        split, i = r["split"], int(Path(r["path"]).stem)
        if i in planted.flips[split]:
            assert r["suggested"] == planted.classes[planted.true[split][i]] != r["given"]
    flagged = planted.result.summary["label_issues"]
    scores = [float(r["score"]) for r in rows]
    assert scores[:flagged] == sorted(scores[:flagged]) and scores[flagged:] == sorted(scores[flagged:])  # flagged first, each by score
    assert abs(planted.result.summary["noise_rate"] - n_flips / len(rows)) < 0.02


def test_copies_across_splits_come_first_and_exact_copies_are_found_by_hash(planted: SimpleNamespace) -> None:
    header, rows = _rows(planted.result.files.duplicates)
    assert tuple(header) == DUPLICATE_COLUMNS
    pairs = {(r["path_a"], r["path_b"]): r for r in rows}
    assert pairs[planted.exact]["kind"] == "exact" and rows[0]["kind"] == "exact"
    for i, t in zip(range(planted.n_train - 5, planted.n_train - 1), planted.copies):
        hit = [r for r in rows if Path(r["path_a"]).stem == f"{i:03d}" and r["split_b"] == "test" and Path(r["path_b"]).stem == f"{t:03d}"]
        assert len(hit) == 1 and hit[0]["kind"] == "near" and float(hit[0]["similarity"]) >= planted.config.threshold
    within = [r for r in rows if r["split_a"] == r["split_b"]]
    assert [(Path(r["path_a"]).stem, Path(r["path_b"]).stem) for r in within] == [("010", "011")]
    assert len(rows) == 6 and rows.index(within[0]) == 5  # nothing else above the threshold, cross-split pairs first
    assert [float(r["similarity"]) for r in rows[1:5]] == sorted((float(r["similarity"]) for r in rows[1:5]), reverse=True)
    s = planted.result.summary
    assert s["duplicates"] == {"exact": 1, "near": 5, "cross_split": 5, "by_splits": {"train-test": {"exact": 1, "near": 4},
                               "train-train": {"exact": 0, "near": 1}}, "truncated": False}
    assert s["leaked_test_images"] == 5 and leaked_test_paths(planted.result.files.duplicates) == {r["path_b"] for r in rows[:5]}


def test_the_far_image_is_the_first_outlier(planted: SimpleNamespace) -> None:
    header, rows = _rows(planted.result.files.outliers)
    assert tuple(header) == OUTLIER_COLUMNS and len(rows) == planted.n_train + 200
    assert (rows[0]["split"], Path(rows[0]["path"]).stem) == ("train", "007")
    assert planted.result.summary["outliers"] >= 1 and float(rows[0]["score"]) > planted.result.summary["outlier_fence"]


def test_an_audit_is_reused_until_its_settings_or_caches_change(planted: SimpleNamespace, tmp_path: Path) -> None:
    summary = json.loads(planted.result.files.summary.read_text())
    assert summary["config"]["threshold"] == planted.config.threshold and summary["inputs"]["config"]["value"] == 1.0
    assert "cleanlab" in summary["versions"]
    with single_threaded():
        assert audit(planted.config, progress=False).status == "up-to-date"
        other = audit(replace(planted.config, threshold=0.5, output=str(tmp_path / "a")), progress=False)
    assert other.status == "audited" and other.dir == tmp_path / "a"
    assert other.summary["duplicates"]["near"] > planted.result.summary["duplicates"]["near"]


def test_fit_head_leaves_out_the_most_suspect_images(planted: SimpleNamespace) -> None:
    listing = planted.result.files.label_issues
    base = HeadConfig(clf="logreg", grid=(1.0,), refine=0, train_cache=str(planted.caches["train"]), val_cache=str(planted.caches["val"]))
    with single_threaded():
        full = fit_head(base)
        cleaned = fit_head(replace(base, exclude=str(listing), exclude_top=10))
        flagged = fit_head(replace(base, exclude=str(listing)))  # what the audit flagged
    assert full.path == layout.heads_dir(planted.caches["train"]) / "logreg.json"
    assert cleaned.path == layout.heads_dir(planted.caches["train"]) / "exclude-10" / "logreg.json"
    meta = json.loads(cleaned.path.read_text())
    left_out = suspects(listing, 10)
    assert meta["excluded"]["images"] == 10 and meta["excluded"]["train"] == sum(s == "train" for s, _ in left_out)
    assert meta["train_cache"]["rows"] == planted.n_train - meta["excluded"]["train"]
    assert meta["val_cache"]["rows"] == 100 - meta["excluded"]["val"]
    assert meta["inputs"]["excluded"] != json.loads(flagged.path.read_text())["inputs"]["excluded"]
    assert flagged.path.parent.name == f"exclude-{planted.result.summary['label_issues']}"
    assert len(suspects(listing)) == planted.result.summary["label_issues"]
    with single_threaded():  # the same list is reused; another list with the same name is not
        assert fit_head(replace(base, exclude=str(listing), exclude_top=10)).status == "up-to-date"
        moved = planted.root / "elsewhere" / "label_issues.csv"
        moved.parent.mkdir(exist_ok=True)
        _, rows = _rows(listing)
        with open(moved, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(LABEL_COLUMNS)
            w.writerows([r[c] for c in LABEL_COLUMNS] for r in rows[::-1])
        assert fit_head(replace(base, exclude=str(moved), exclude_top=10)).status == "fitted"
    with pytest.raises(ValueError, match="give the number"):
        suspects(moved)
    with pytest.raises(ValueError, match="columns"):
        suspects(planted.result.files.outliers, 3)


# ---------------------------------------------------------------- end to end, on images


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A tiny image folder with one train image copied into test, extracted with a random-weight MobileNetV2."""
    root = tmp_path_factory.mktemp("audit-images")
    with pytest.MonkeyPatch.context() as m, single_threaded():
        m.setenv("PIPELINE_OFFLINE", "1")
        m.chdir(root)
        data = make_image_folder(root / "ds", {"train": 12, "test": 5})
        shutil.copy(data / "train" / "bee" / "004.png", data / "test" / "bee" / "100.png")  # a leak
        source = ExtractConfig(data=str(data), cache_dir=str(root / "features"), **tiny())
        for split in ("train", "val", "test"):
            extract(replace(source, split=split), progress=False)
    return SimpleNamespace(root=root, data=data, source=source)


def test_the_audit_command_end_to_end_then_fit_head_and_the_report(images: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(images.root)
    invoke = lambda *args: CliRunner().invoke(cli, [str(a) for a in args])  # noqa: E731
    where = ["--data", images.data, "--weights", "none", "--cache-dir", images.source.cache_dir]
    with single_threaded():
        r = invoke("fit-head", "--clf", "logreg", "--grid", "1.0", "--refine", "0", "--evaluate", *where)
        assert r.exit_code == 0, r.output
        r = invoke("audit", "--folds", "3", "--no-progress", *where)
        assert r.exit_code == 0, r.output
        folder = layout.audit_dir(Path(images.source.cache_dir) / "ds" / "mobilenet_v2-none" / "classifier-input" / "train.h5")
        assert f"-> {folder}" in r.output and "label issues: " in r.output and "1 test images also in train or val" in r.output
        assert "C=1, chosen on val by" in r.output  # the saved head's value
        _, rows = _rows(folder / "duplicates.csv")
        # The copied image is in train, or in the val carved from it.
        assert (rows[0]["path_a"], rows[0]["path_b"], rows[0]["split_b"], rows[0]["kind"]) == ("train/bee/004.png", "test/bee/100.png", "test", "exact")
        assert rows[0]["split_a"] in ("train", "val") and float(rows[0]["similarity"]) > 0.999
        with read_cache(folder.parent / "train.h5") as train, read_cache(folder.parent / "val.h5") as val:
            assert len(_rows(folder / "label_issues.csv")[1]) == len(train) + len(val)
        again = invoke("audit", "--folds", "3", "--no-progress", *where)
        assert again.exit_code == 0 and "up to date; nothing to do" in again.output

        r = invoke("fit-head", "--clf", "logreg", "--grid", "1.0", "--refine", "0", "--top", "3", "--evaluate", *where)
        assert r.exit_code == 0, r.output
        assert f"{folder.parent / 'heads' / 'exclude-3' / 'logreg.json'}" in r.output

        result = build_report(images.source, ReportConfig(projection="pca", projection_points=30, grid_images=4, audit_images=3))
    md = result.markdown.read_text()
    assert "## Audit: labels, duplicates and outliers" in md and "test images also appear in train or val" in md
    part = md.split("## Audit")[1].split("\n## ")[0]
    assert "| logreg |" in part and "of 16" in part  # 15 test images and the leak: one left out
    assert "| logreg | 3 |" in part  # the head fitted without the 3 most suspect images
    with Image.open(result.html.parent / "audit.png") as img:
        img.verify()
    assert "![The audit's top suspects" in md and 'alt="The audit&#x27;s top suspects' in result.html.read_text()
    if find_chromium():  # the page, the audit's figure included, renders
        seen = check_render(result.html)
        assert seen.ok and seen.images == len(result.figures)


def test_the_audit_command_explains_what_is_missing(tmp_path: Path) -> None:
    r = CliRunner().invoke(cli, ["audit", "--data", str(tmp_path / "nothing"), "--weights", "none", "--cache-dir", str(tmp_path)])
    assert r.exit_code == 1 and "no feature cache at" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(cli, ["audit", "--folds", "1"])
    assert r.exit_code == 2 and "--folds" in r.output
    with pytest.raises(ValueError, match="threshold is a cosine similarity"):
        AuditConfig(threshold=1.5)
