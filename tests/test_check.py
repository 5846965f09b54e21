"""pipeline check: the dataset as extract will read it, without a model."""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline.check import check_dataset
from pipeline.config import DatasetSpec

from .helpers import invoke


def test_a_clean_folder_is_ok(image_folder: Path) -> None:
    report = check_dataset(DatasetSpec(str(image_folder), val_fraction=0.3))
    assert report.ok and report.classes == ["ant", "bee", "cat"] and report.duplicates == []
    assert {n: s.images for n, s in report.splits.items()} == {"train": 21, "val": 9, "test": 9}
    assert report.splits["test"].per_class == {"ant": 3, "bee": 3, "cat": 3} and report.splits["test"].tiny_classes == ["ant", "bee", "cat"]
    assert report.splits["train"].sizes == {(44, 36): 21} and report.splits["train"].modes == {"RGB": 21}
    result = invoke("check", image_folder, "--val-fraction", "0.3")
    assert result.exit_code == 0, result.output
    assert "  val         9 images, carved from train (0.3, seed 0); smallest class ant (3); sizes 44x36 (9); modes RGB (9)" in result.output
    assert result.output.strip().endswith("ok: every image is readable and no file is in two splits")


def test_unreadable_files_leaks_and_ignored_files_are_named(image_folder: Path) -> None:
    shutil.copy(image_folder / "test" / "ant" / "000.png", image_folder / "train" / "ant" / "copy.png")
    (image_folder / "train" / "bee" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not the rest")
    (image_folder / "train" / "cat" / "empty.jpg").write_bytes(b"")
    (image_folder / "test" / "cat" / ".DS_Store").write_bytes(b"Bud1")
    shutil.copy(image_folder / "test" / "bee" / "000.png", image_folder / "test" / "bee" / "again.png")
    report = check_dataset(DatasetSpec(str(image_folder), val_fraction=0.3))
    unreadable = report.splits["train"].unreadable + report.splits["val"].unreadable
    assert sorted(rel for rel, _ in unreadable) == ["train/bee/bad.png", "train/cat/empty.jpg"]
    assert len(report.leaks) == 1 and {rel for _, rel in report.leaks[0]} == {"test/ant/000.png", "train/ant/copy.png"}
    assert [sorted(g) for g in report.duplicates if g not in report.leaks] == [[("test", "test/bee/000.png"), ("test", "test/bee/again.png")]]
    assert report.splits["test"].ignored == [("test/cat/.DS_Store", "hidden file")] and not report.ok
    result = invoke("check", image_folder, "--val-fraction", "0.3")
    assert result.exit_code == 1
    assert "        unreadable train/cat/empty.jpg: empty file (0 bytes)" in result.output
    assert "  leak: the same bytes in " in result.output and "test:test/ant/000.png" in result.output
    assert result.output.strip().endswith("Error: 2 unreadable file(s), 1 duplicate group(s) across splits")
