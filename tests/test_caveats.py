"""Warnings where the numbers cannot mean much: each check by hand, then as fit-head and evaluate record and print them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.caveats import at_chance, few_images, tied_sweep
from pipeline.evaluate import compare, evaluate
from pipeline.fit import HeadConfig, fit_head

from .helpers import invoke, ok
from .test_fit import CACHE_DIR, SOURCE, make_caches, write_features

pytestmark = pytest.mark.usefixtures("one_thread")

CLI = ["--data", "ds", "--weights", "none"]


def test_few_images_names_the_classes_below_five() -> None:
    assert few_images(np.repeat([0, 1, 2], 5), ["a", "b", "c"], "val") == []
    assert few_images(np.array([0] * 5 + [1] * 4 + [2] * 9), ["a", "b", "c", "d"], "test") == [
        "the test split has fewer than 5 images of 2 of its 4 classes (b 4, d 0): one image moves a class's accuracy by "
        "20 points or more, so its per-class numbers are mostly noise"]
    many = few_images(np.arange(7), [f"c{i}" for i in range(7)], "val")[0]
    assert "of 7 of its 7 classes (c0 1, c1 1, c2 1, c3 1, c4 1 and 2 more)" in many and "choices made on it are mostly noise" in many


def test_at_chance_is_within_two_points_of_one_over_k() -> None:
    assert at_chance(0.25, 4) == ["the head's train accuracy 25.00% is at chance (1/4 = 25.00%): it learnt nothing from the "
                                  "features; check the labels, the features (a random backbone?) and the swept values"]
    assert at_chance(0.269, 4) and at_chance(0.1, 4)
    assert at_chance(0.271, 4) == [] and at_chance(None, 4) == []


def test_a_tied_sweep_is_one_where_every_tried_value_scored_the_same() -> None:
    rows = [{"value": 0.1, "val_accuracy": 0.8}, {"value": 1.0, "val_accuracy": 0.8}, {"value": 10, "skipped": "too many"}]
    assert tied_sweep(rows, "C", 0.1) == ["every C of the sweep (0.1, 1) gave the same val accuracy 80.00%: val did not choose "
                                          "C=0.1, it was the first tried; sweep other values"]
    assert tied_sweep(rows[:1], "C", 0.1) == []
    assert tied_sweep([rows[0], {"value": 1.0, "val_accuracy": 0.81}], "C", 1.0) == []


def test_fit_head_warns_of_a_small_val_split_and_a_tied_sweep_once() -> None:
    make_caches(k=3, n=(20, 3, 10))  # 3 val images per class; separable, so every C scores 100 % on val
    out = ok(invoke("fit-head", *CLI, "--clf", "logreg", "--grid", "0.1,1", "--refine", "0"))
    warned = [line for line in out.splitlines() if line.startswith("warning: ")]
    assert len(warned) == 2 and len(set(warned)) == 2
    assert warned[0].startswith("warning: the val split has fewer than 5 images of 3 of its 3 classes (c0 3, c1 3, c2 3)")
    assert warned[1].startswith("warning: every C of the sweep (0.1, 1) gave the same val accuracy 100.00%")
    meta = json.loads((CACHE_DIR / "heads" / "logreg.json").read_text())
    assert ["warning: " + w for w in meta["warnings"]] == warned
    # A head reused as it is keeps its warnings, and says them again.
    again = ok(invoke("fit-head", *CLI, "--clf", "logreg", "--grid", "0.1,1", "--refine", "0"))
    assert "up to date" in again and [line for line in again.splitlines() if line.startswith("warning: ")] == warned


def test_fit_head_warns_of_a_head_at_chance_on_its_train_split() -> None:
    # Every image has the same features: nothing to learn, and a balanced train split is 1/4 right whatever is said.
    classes = ["c0", "c1", "c2", "c3"]
    for split, per_class in (("train", 10), ("val", 5)):
        write_features(CACHE_DIR / f"{split}.h5", np.ones((4 * per_class, 8), np.float32), np.repeat(np.arange(4), per_class), classes)
    result = fit_head(HeadConfig(clf="logreg", grid=(1.0,), refine=0, preprocessing="standardize"), SOURCE)
    meta = json.loads(result.path.read_text())
    assert meta["train_accuracy"] == 0.25
    assert [w for w in result.warnings if "at chance" in w] == [f"the head's train accuracy {meta['train_accuracy']:.2%} is at chance "
                                                               "(1/4 = 25.00%): it learnt nothing from the features; check the labels, "
                                                               "the features (a random backbone?) and the swept values"]
    assert result.warnings == meta["warnings"]


def test_a_well_posed_fit_and_evaluation_warn_of_nothing() -> None:
    make_caches(k=4, sep=0.4, n=(30, 30, 5))  # overlapping classes: the values of the sweep score differently
    result = fit_head(HeadConfig(clf="logreg", grid=(1e-4, 1e-2, 1.0), refine=0), SOURCE)
    assert len({row["val_accuracy"] for row in result.sweep}) > 1 and result.warnings == []
    assert evaluate(result.path)["warnings"] == []
    assert "warning" not in ok(invoke("evaluate", "--clf", "logreg", *CLI))


def test_evaluate_warns_of_a_small_test_split_once_and_compare_carries_it() -> None:
    make_caches(k=3, n=(20, 10, 4))
    head = fit_head(HeadConfig(clf="logreg", grid=(1.0,), refine=0), SOURCE).path
    m = evaluate(head)
    assert m["warnings"] == [few_images(np.repeat([0, 1, 2], 4), ["c0", "c1", "c2"], "test")[0]]
    assert json.loads((CACHE_DIR / "heads" / "logreg-test.json").read_text())["warnings"] == m["warnings"]
    out = ok(invoke("evaluate", head))
    assert [line for line in out.splitlines() if line.startswith("warning: ")] == ["warning: " + m["warnings"][0]]
    assert compare(source=SOURCE)[0]["warnings"] == m["warnings"]


def test_the_linear_heads_default_sweep_is_not_a_tie() -> None:
    # Overlapping classes: the learning rates of the default grid reach different val accuracies, as on real features.
    make_caches(k=4, sep=0.5, n=(40, 40, 5))
    result = fit_head(HeadConfig(clf="linear", refine=0, epochs=10), SOURCE)
    assert result.param == "lr" and len(result.sweep) == 4
    assert len({row["val_accuracy"] for row in result.sweep}) > 1 and not any("same val accuracy" in w for w in result.warnings)
