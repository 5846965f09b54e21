"""Datasets: decoding to RGB, bad files under both policies, stable stratified splits, the CSV layout, fingerprints."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import DatasetSpec, ExtractConfig, extract, load_split, read_cache
from pipeline.data import UnreadableImageError, load_rgb

from .conftest import CLASSES, make_image_folder, tiny



def _exact(message: str) -> str:
    """A ``match`` pattern for exactly this message."""
    return f"^{re.escape(message)}$"


# ---------------------------------------------------------------- decoding


def _pixels(path: Path) -> np.ndarray:
    im = load_rgb(path)
    assert im.mode == "RGB"
    arr = np.asarray(im)
    assert arr.dtype == np.uint8
    return arr


def test_jpeg_decodes_to_rgb(tmp_path: Path) -> None:
    Image.new("RGB", (12, 8), (200, 40, 90)).save(tmp_path / "a.jpg", quality=95)
    arr = _pixels(tmp_path / "a.jpg")
    assert arr.shape == (8, 12, 3)
    # JPEG is lossy: a flat colour comes back within a few levels.
    assert np.abs(arr.astype(int) - [200, 40, 90]).max() <= 3


def test_png_rgb_is_exact(tmp_path: Path) -> None:
    src = np.random.default_rng(0).integers(0, 256, (5, 7, 3)).astype(np.uint8)
    Image.fromarray(src).save(tmp_path / "a.png")
    np.testing.assert_array_equal(_pixels(tmp_path / "a.png"), src)


def test_grayscale_repeats_the_channel(tmp_path: Path) -> None:
    Image.fromarray(np.array([[0, 17, 255]], dtype=np.uint8), mode="L").save(tmp_path / "g.png")
    assert _pixels(tmp_path / "g.png").tolist() == [[[0, 0, 0], [17, 17, 17], [255, 255, 255]]]


def test_rgba_transparent_becomes_white_and_opaque_keeps_its_colour(tmp_path: Path) -> None:
    rgba = np.array([[[10, 20, 30, 0], [10, 20, 30, 255], [200, 0, 0, 128]]], dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "t.png")
    arr = _pixels(tmp_path / "t.png")
    assert arr[0, 0].tolist() == [255, 255, 255]
    assert arr[0, 1].tolist() == [10, 20, 30]
    # Half transparent red over white: red stays, green and blue are half way to white.
    assert arr[0, 2, 0] >= 227 and 120 <= arr[0, 2, 1] <= 130 and 120 <= arr[0, 2, 2] <= 130


def _palette_image() -> Image.Image:
    im = Image.new("P", (2, 1))
    im.putpalette([10, 20, 30, 200, 100, 50] + [0] * (256 * 3 - 6))
    im.putpixel((0, 0), 0)
    im.putpixel((1, 0), 1)
    return im


def test_palette_without_transparency_keeps_palette_colours(tmp_path: Path) -> None:
    _palette_image().save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    assert _pixels(tmp_path / "p.png").tolist() == [[[10, 20, 30], [200, 100, 50]]]


@pytest.mark.parametrize("name", ["p.png", "p.gif"])
def test_palette_transparent_index_becomes_white(tmp_path: Path, name: str) -> None:
    _palette_image().save(tmp_path / name, transparency=0)
    assert Image.open(tmp_path / name).mode == "P"
    assert _pixels(tmp_path / name).tolist() == [[[255, 255, 255], [200, 100, 50]]]


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    Image.fromarray(np.array([[0, 65535, 32896, 257]], dtype=np.uint16)).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    assert _pixels(tmp_path / "g16.png")[..., 0].tolist() == [[0, 255, 128, 1]]
    assert (np.ptp(_pixels(tmp_path / "g16.png"), axis=-1) == 0).all()


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_colour_key_transparency_becomes_white(tmp_path: Path, mode: str) -> None:
    if mode == "L":
        Image.fromarray(np.array([[0, 100]], dtype=np.uint8), mode="L").save(tmp_path / "k.png", transparency=0)
        opaque = [100, 100, 100]
    else:
        Image.fromarray(np.array([[[1, 2, 3], [100, 150, 200]]], dtype=np.uint8)).save(tmp_path / "k.png", transparency=(1, 2, 3))
        opaque = [100, 150, 200]
    assert "transparency" in Image.open(tmp_path / "k.png").info
    assert _pixels(tmp_path / "k.png").tolist() == [[[255, 255, 255], opaque]]


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    # 40 wide, 20 tall: red left half, blue right half; Orientation=6 means "rotate 90 degrees clockwise to view".
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).save(tmp_path / "o.jpg", exif=exif.tobytes(), quality=95)
    assert Image.open(tmp_path / "o.jpg").size == (40, 20)
    im = load_rgb(tmp_path / "o.jpg")
    assert im.size == (20, 40)
    out = np.asarray(im).astype(int)
    # Turned clockwise, the left (red) half is now on top and the right (blue) half below.
    assert np.abs(out[5, 10] - [255, 0, 0]).max() < 40
    assert np.abs(out[35, 10] - [0, 0, 255]).max() < 40


def test_unreadable_file_names_itself(tmp_path: Path) -> None:
    (tmp_path / "x.png").write_bytes(b"not a png at all")
    with pytest.raises(UnreadableImageError, match=re.escape(f"{tmp_path / 'x.png'}: cannot decode image (UnidentifiedImageError: ")) as e:
        load_rgb(tmp_path / "x.png")
    assert e.value.path == str(tmp_path / "x.png") and e.value.reason.startswith("cannot decode image")
    assert isinstance(e.value, ValueError)


# ---------------------------------------------------------------- bad files, both policies


def _truncated(path: Path, fmt: str) -> None:
    src = np.random.default_rng(1).integers(0, 256, (40, 40, 3)).astype(np.uint8)
    Image.fromarray(src).save(path, format=fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# name -> (how to make the file, the reason recorded: exact for refused files, a regex where PIL words the detail)
_REJECTED = {
    "empty.jpg": (lambda p: p.write_bytes(b""), "empty file (0 bytes)"),
}
# Files an image folder often holds that are never images: ignored, as torchvision's ImageFolder ignores them.
_IGNORED = {
    "notes.txt": (lambda p: p.write_text("hello"), "not an image file (extension '.txt')"),
    ".DS_Store": (lambda p: p.write_bytes(b"\0\0\0\1Bud1"), "hidden file"),
    "._001.png": (lambda p: p.write_bytes(b"\0\5\26\7AppleDouble"), "hidden file"),
    "Thumbs.db": (lambda p: p.write_bytes(b"\xd0\xcf\x11\xe0"), "system file"),
    "desktop.ini": (lambda p: p.write_text("[.ShellClassInfo]"), "system file"),
}
_UNDECODABLE = {
    "half.png": (lambda p: _truncated(p, "PNG"), r"cannot decode image \(OSError: image file is truncated.*\)"),
    "half.jpg": (lambda p: _truncated(p, "JPEG"), r"cannot decode image \(OSError: image file is truncated.*\)"),
    "x.png": (
        lambda p: p.write_bytes(np.random.default_rng(2).bytes(300)),
        r"cannot decode image \(UnidentifiedImageError: cannot identify image file .*x\.png'\)",
    ),
}


def _good_test_paths() -> list[str]:
    return [f"test/{cls}/{i:03d}.png" for cls in CLASSES for i in range(3)]


@pytest.mark.parametrize("name", list(_REJECTED))
def test_file_that_cannot_be_an_image_fails_naming_it(image_folder: Path, name: str) -> None:
    make, reason = _REJECTED[name]
    make(image_folder / "test" / "ant" / name)
    expected = f"{image_folder / 'test' / 'ant' / name}: {reason}; remove or fix it, or pass --on-error skip"
    with pytest.raises(ValueError, match=_exact(expected)):
        extract(ExtractConfig(data=str(image_folder), split="test", **tiny()), progress=False)


@pytest.mark.parametrize("name", list(_UNDECODABLE))
def test_undecodable_image_fails_naming_it(image_folder: Path, name: str) -> None:
    make, reason = _UNDECODABLE[name]
    make(image_folder / "test" / "ant" / name)
    # A broken header or PNG checksum is found by the scan before any work; a truncated JPEG when it is decoded.
    reason = {"half.png": r"cannot decode image \(OSError: Truncated File Read\)"}.get(name, reason)
    tail = "fix or remove the file" if name == "half.jpg" else "remove or fix it"
    expected = f"^{re.escape(str(image_folder / 'test' / 'ant' / name))}: {reason}; {tail}, or pass --on-error skip$"
    with pytest.raises(ValueError, match=expected):
        extract(ExtractConfig(data=str(image_folder), split="test", **tiny()), progress=False)


def test_bad_files_are_skipped_and_recorded_under_skip(image_folder: Path) -> None:
    where = {".DS_Store": "ant", "empty.jpg": "ant", "notes.txt": "bee", "half.png": "bee", "half.jpg": "cat", "x.png": "cat"}
    for name, cls in where.items():
        {**_REJECTED, **_IGNORED, **_UNDECODABLE}[name][0](image_folder / "test" / cls / name)
    # Batches of 2: the last batch (cat/half.jpg, cat/x.png) has no readable image at all.
    result = extract(ExtractConfig(data=str(image_folder), split="test", on_error="skip", **tiny(batch_size=2)), progress=False)
    assert result.status == "extracted" and result.n_images == 9 and result.n_skipped == 4
    assert result.ignored == [("test/ant/.DS_Store", "hidden file"), ("test/bee/notes.txt", "not an image file (extension '.txt')")]
    # Files refused by the scan come first, in scan order, then the ones that failed to decode, in split order.
    assert [p for p, _ in result.skipped] == ["test/ant/empty.jpg", "test/bee/half.png", "test/cat/half.jpg", "test/cat/x.png"]
    for path, why in result.skipped:
        name = Path(path).name
        if name in _REJECTED:
            assert why == _REJECTED[name][1]
        else:
            assert re.fullmatch(_UNDECODABLE[name][1], why), why
    with read_cache(result.path) as c:
        assert c.skipped == result.skipped
        assert c.paths == _good_test_paths()
        assert c.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
        assert c.features().shape == (9, 1280) and np.isfinite(c.features()).all()
        assert c.attrs["n_skipped"] == 4 and c.attrs["n_rows"] == 9 and c.attrs["n_ignored"] == 2


def test_every_bad_file_is_named_in_one_failure(image_folder: Path) -> None:
    test = image_folder / "test"
    (test / "ant" / "a.txt").write_text("x")  # ignored, not a failure
    (test / "bee" / "b.jpg").write_bytes(b"")
    _truncated(test / "cat" / "c.png", "PNG")
    (test / "cat" / "d.png").write_bytes(b"not an image")
    expected = (f"3 files in the test split cannot be read: {test / 'bee' / 'b.jpg'}: empty file (0 bytes); "
                f"{test / 'cat' / 'c.png'}: cannot decode image (OSError: Truncated File Read); "
                f"{test / 'cat' / 'd.png'}: cannot decode image (UnidentifiedImageError: cannot identify image file '{test / 'cat' / 'd.png'}'); "
                "remove or fix them, or pass --on-error skip")
    with pytest.raises(ValueError, match=_exact(expected)):
        extract(ExtractConfig(data=str(image_folder), split="test", **tiny()), progress=False)
    # More than ten: the message shows ten, and the full list is written beside the caches.
    for i in range(12):
        (test / "ant" / f"e{i:02d}.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"^15 files in the test split cannot be read: .*; and 5 more \(all listed in features/ds/unreadable-test.txt\); remove"):
        extract(ExtractConfig(data=str(image_folder), split="test", **tiny()), progress=False)
    listed = Path("features/ds/unreadable-test.txt").read_text().splitlines()
    assert len(listed) == 15 and listed[0] == f"{test / 'ant' / 'e00.png'}\tempty file (0 bytes)"
    # Once they are removed, the same command works: the refused run left nothing behind.
    for p in [*test.glob("*/e*.png"), test / "bee" / "b.jpg", test / "cat" / "c.png", test / "cat" / "d.png"]:
        p.unlink()
    assert extract(ExtractConfig(data=str(image_folder), split="test", **tiny()), progress=False).n_images == 9


@pytest.mark.parametrize("name", list(_IGNORED))
def test_files_that_are_never_images_are_ignored_and_counted(image_folder: Path, name: str) -> None:
    make, reason = _IGNORED[name]
    make(image_folder / "test" / "ant" / name)
    make(image_folder / "test" / name)  # beside the class folders too
    (image_folder / "test" / "bee" / ".thumbnails").mkdir()
    make(image_folder / "test" / "bee" / ".thumbnails" / "001.png")
    result = extract(ExtractConfig(data=str(image_folder), split="test", **tiny()), progress=False)
    assert result.n_images == 9 and result.n_skipped == 0
    assert result.ignored == [(f"test/{name}", reason), ("test/ant/" + name, reason), ("test/bee/.thumbnails/", "hidden folder")]


def test_file_outside_class_folders_is_ignored(image_folder: Path) -> None:
    (image_folder / "test" / "stray.png").write_bytes(b"x")
    split = load_split(DatasetSpec(str(image_folder)), "test")
    assert split.rejected == [] and [(r.path, r.reason) for r in split.ignored] == [("test/stray.png", "not inside a class folder")]
    assert split.paths == _good_test_paths()


# ---------------------------------------------------------------- splits


def test_carved_val_is_stratified_disjoint_complete_and_stable(image_folder: Path) -> None:
    spec = DatasetSpec(str(image_folder), val_fraction=0.3)
    train, val = load_split(spec, "train"), load_split(spec, "val")
    assert len(val) == 9 and len(train) == 21  # ceil(0.3 * 30)
    assert sorted(np.bincount(val.labels, minlength=3).tolist()) == [3, 3, 3]
    assert set(train.paths).isdisjoint(val.paths)
    everything = {f"train/{cls}/{i:03d}.png" for cls in CLASSES for i in range(10)}
    assert set(train.paths) | set(val.paths) == everything
    for split in (train, val):
        assert all(p.split("/")[1] == CLASSES[y] for p, y in zip(split.paths, split.labels))
        assert split.classes == list(CLASSES)
        assert split.carved == {"from": "train", "val_fraction": 0.3, "seed": 0}
    again = load_split(spec, "val")
    assert again.paths == val.paths and again.labels.tolist() == val.labels.tolist()
    other = load_split(DatasetSpec(str(image_folder), val_fraction=0.3, split_seed=1), "val")
    assert other.paths != val.paths and len(other) == 9


@pytest.mark.parametrize(("fraction", "n_val"), [(0.1, 3), (0.2, 6), (0.5, 15)])
def test_val_fraction_is_respected(image_folder: Path, fraction: float, n_val: int) -> None:
    spec = DatasetSpec(str(image_folder), val_fraction=fraction)
    val, train = load_split(spec, "val"), load_split(spec, "train")
    assert len(val) == n_val and len(train) == 30 - n_val
    assert (np.bincount(val.labels, minlength=3) >= 1).all()


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_val_fraction_outside_0_1_is_refused(image_folder: Path, fraction: float) -> None:
    with pytest.raises(ValueError, match=_exact(f"the val fraction must be between 0 and 1, got {fraction}")):
        load_split(DatasetSpec(str(image_folder), val_fraction=fraction), "val")


def test_existing_val_folder_is_used_as_is(image_folder: Path) -> None:
    make_image_folder(image_folder, {"val": 2}, seed=3)
    spec = DatasetSpec(str(image_folder))
    val, train = load_split(spec, "val"), load_split(spec, "train")
    assert val.paths == [f"val/{cls}/{i:03d}.png" for cls in CLASSES for i in range(2)]
    assert train.paths == [f"train/{cls}/{i:03d}.png" for cls in CLASSES for i in range(10)]
    assert val.carved is None and train.carved is None
    test = load_split(spec, "test")
    assert test.paths == _good_test_paths() and test.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


@pytest.mark.parametrize("split", ["val", "test"])
def test_class_folder_that_train_lacks_is_refused(image_folder: Path, split: str) -> None:
    make_image_folder(image_folder, {"val": 2})
    (image_folder / split / "dog").mkdir()
    expected = f"{image_folder / split} has class folder(s) ['dog'] that {image_folder / 'train'} lacks"
    with pytest.raises(ValueError, match=_exact(expected)):
        load_split(DatasetSpec(str(image_folder)), split)


def test_val_folder_may_lack_a_class(image_folder: Path) -> None:
    (image_folder / "val" / "ant").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(image_folder / "val" / "ant" / "a.png")
    val = load_split(DatasetSpec(str(image_folder)), "val")
    assert val.paths == ["val/ant/a.png"] and val.classes == list(CLASSES)


def test_dataset_layout_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match=_exact(f"dataset folder {missing} not found")):
        load_split(DatasetSpec(str(missing)), "train")
    root = tmp_path / "ds"
    root.mkdir()
    with pytest.raises(ValueError, match=_exact(f"{root} has no train/ folder (expected {root}/<split>/<class>/<image>)")):
        load_split(DatasetSpec(str(root)), "train")
    (root / "train" / ".hidden").mkdir(parents=True)
    train = root / "train"
    with pytest.raises(ValueError, match=_exact(f"{train} has no class folders (expected {root}/train/<class>/<image>)")):
        load_split(DatasetSpec(str(root)), "train")
    with pytest.raises(ValueError, match=r"^unknown split 'dev'; expected one of train, val, test$"):
        load_split(DatasetSpec(str(root)), "dev")


def test_missing_test_folder_and_a_test_only_dataset(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "only-train", {"train": 2})
    with pytest.raises(ValueError, match=_exact(f"{root} has no test/ folder (expected {root}/<split>/<class>/<image>)")):
        load_split(DatasetSpec(str(root)), "test")
    # Without train/, a split's own class folders are its classes.
    root = make_image_folder(tmp_path / "only-test", {"test": 2})
    (root / "test" / "ant").rename(root / "test" / "zebra")
    test = load_split(DatasetSpec(str(root)), "test")
    assert test.classes == ["bee", "cat", "zebra"]
    assert test.paths == [f"test/{c}/{i:03d}.png" for c in test.classes for i in range(2)]
    assert test.labels.tolist() == [0, 0, 1, 1, 2, 2]


def test_class_with_one_image_cannot_be_carved(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "ds", {"train": 3})
    for p in ["001.png", "002.png"]:
        (root / "train" / "bee" / p).unlink()
    expected = "cannot carve a stratified val split: class(es) ['bee'] have a single image (need at least 2)"
    for split in ("train", "val"):
        with pytest.raises(ValueError, match=_exact(expected)):
            load_split(DatasetSpec(str(root)), split)
    # With a val/ folder nothing is carved, so train loads.
    make_image_folder(root, {"val": 1})
    assert len(load_split(DatasetSpec(str(root)), "train")) == 7


def test_fraction_too_small_for_the_classes(image_folder: Path) -> None:
    expected = (
        "cannot carve a stratified val split: 0.05 of 30 images does not leave one image per class for each side "
        "(3 classes); change the val fraction"
    )
    with pytest.raises(ValueError, match=_exact(expected)):
        load_split(DatasetSpec(str(image_folder), val_fraction=0.05), "val")


# ---------------------------------------------------------------- the CSV layout

BREEDS = ("beagle", "akita", "corgi")  # not sorted: classes must come out sorted


def make_csv_dataset(root: Path, per_breed: int = 10, *, image_dir: str = "train", extension: str = ".jpg",
                     csv_name: str = "labels.csv", header: tuple[str, str] = ("id", "breed")) -> dict[str, str]:
    """A Kaggle dog-breed layout: ``labels.csv`` with id,breed and ``train/<id>.jpg``; returns id -> breed."""
    (root / image_dir).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = {}
    for b, breed in enumerate(BREEDS):
        for i in range(per_breed):
            ident = f"{b:x}{i:02x}{rng.integers(1 << 16):04x}"
            rows[ident] = breed
            Image.fromarray(rng.integers(0, 256, (20, 24, 3)).astype(np.uint8)).save(root / image_dir / f"{ident}{extension}")
    (root / csv_name).parent.mkdir(parents=True, exist_ok=True)
    (root / csv_name).write_text(",".join(header) + "\n" + "".join(f"{i},{b}\n" for i, b in rows.items()))
    return rows


def test_csv_splits_are_carved_disjoint_stratified_and_complete(tmp_path: Path) -> None:
    rows = make_csv_dataset(tmp_path / "dogs")
    spec = DatasetSpec(str(tmp_path / "dogs"), labels_csv="labels.csv")
    splits = {s: load_split(spec, s) for s in ("train", "val", "test")}
    assert {s: len(v) for s, v in splits.items()} == {"train": 24, "val": 3, "test": 3}
    for s in splits.values():
        assert s.classes == sorted(BREEDS)
        assert all(s.classes[y] == rows[Path(p).stem] for p, y in zip(s.paths, s.labels))
        assert all(p.startswith("train/") and p.endswith(".jpg") for p in s.paths)
        assert s.carved == {"from": "labels.csv", "test_fraction": 0.1, "val_fraction": 0.1, "seed": 0}
    for s in ("val", "test"):
        assert sorted(splits[s].labels.tolist()) == [0, 1, 2]
    sets = [set(s.paths) for s in splits.values()]
    assert sets[0].isdisjoint(sets[1]) and sets[0].isdisjoint(sets[2]) and sets[1].isdisjoint(sets[2])
    assert sets[0] | sets[1] | sets[2] == {f"train/{i}.jpg" for i in rows}
    assert load_split(spec, "test").paths == splits["test"].paths
    assert load_split(DatasetSpec(str(tmp_path / "dogs"), labels_csv="labels.csv", split_seed=3), "test").paths != splits["test"].paths


def test_csv_custom_columns_extension_and_image_dir(tmp_path: Path) -> None:
    rows = make_csv_dataset(tmp_path / "d", 4, image_dir="imgs", extension=".png", csv_name="meta/lab.csv", header=("file", "kind"))
    spec = DatasetSpec(str(tmp_path / "d"), labels_csv="meta/lab.csv", id_column="file", label_column="kind",
                       image_dir="imgs", extension=".png", val_fraction=0.25, test_fraction=0.25)
    paths = [p for s in ("train", "val", "test") for p in load_split(spec, s).paths]
    assert sorted(paths) == sorted(f"imgs/{i}.png" for i in rows)


def test_csv_missing_column(tmp_path: Path) -> None:
    make_csv_dataset(tmp_path / "d", 2, header=("id", "kind"))
    csv = tmp_path / "d" / "labels.csv"
    with pytest.raises(ValueError, match=_exact(f"{csv} has no column 'breed' (columns: id, kind); set --label-column")):
        load_split(DatasetSpec(str(tmp_path / "d"), labels_csv="labels.csv"), "train")
    with pytest.raises(ValueError, match=_exact(f"{csv} has no column 'file' (columns: id, kind); set --id-column")):
        load_split(DatasetSpec(str(tmp_path / "d"), labels_csv="labels.csv", id_column="file", label_column="kind"), "train")
    with pytest.raises(ValueError, match=_exact(f"labels file {tmp_path / 'd' / 'other.csv'} not found")):
        load_split(DatasetSpec(str(tmp_path / "d"), labels_csv="other.csv"), "train")


@pytest.mark.parametrize("ident", ["../x", "/etc/passwd", "a/../../x", "C:\\x", "..\\x", "C:x"])
def test_csv_id_that_escapes_the_image_root_is_refused(tmp_path: Path, ident: str) -> None:
    root = tmp_path / "d"
    make_csv_dataset(root, 2)
    with open(root / "labels.csv", "a") as f:
        f.write(f"{ident},akita\n")
    expected = f"{root / 'labels.csv'} line 8: image path {ident + '.jpg'!r} escapes the image root {root / 'train'}"
    with pytest.raises(ValueError, match=_exact(expected)):
        load_split(DatasetSpec(str(root), labels_csv="labels.csv"), "train")


def test_csv_id_in_a_subfolder_is_allowed(tmp_path: Path) -> None:
    root = tmp_path / "d"
    rows = make_csv_dataset(root, 4)
    (root / "train" / "sub").mkdir()
    first = next(iter(rows))
    os.replace(root / "train" / f"{first}.jpg", root / "train" / "sub" / f"{first}.jpg")
    (root / "labels.csv").write_text((root / "labels.csv").read_text().replace(f"{first},", f"sub/{first},"))
    spec = DatasetSpec(str(root), labels_csv="labels.csv", val_fraction=0.25, test_fraction=0.25)
    paths = [p for s in ("train", "val", "test") for p in load_split(spec, s).paths]
    assert f"train/sub/{first}.jpg" in paths and len(paths) == 12


def test_csv_line_numbers_count_blank_lines(tmp_path: Path) -> None:
    root = tmp_path / "d"
    (root / "train").mkdir(parents=True)
    (root / "labels.csv").write_text("id,breed\n\na,x\n../b,y\n")
    expected = f"{root / 'labels.csv'} line 4: image path '../b.jpg' escapes the image root {root / 'train'}"
    with pytest.raises(ValueError, match=_exact(expected)):
        load_split(DatasetSpec(str(root), labels_csv="labels.csv"), "train")


def test_csv_duplicate_and_empty_ids(tmp_path: Path) -> None:
    root = tmp_path / "d"
    rows = make_csv_dataset(root, 2)
    first = next(iter(rows))
    text = (root / "labels.csv").read_text()
    (root / "labels.csv").write_text(text + f"{first},corgi\n")
    csv = root / "labels.csv"
    with pytest.raises(ValueError, match=_exact(f"{csv} line 8: duplicate image id {first!r}")):
        load_split(DatasetSpec(str(root), labels_csv="labels.csv"), "train")
    (root / "labels.csv").write_text(text + ",corgi\n")
    with pytest.raises(ValueError, match=_exact(f"{csv} line 8: empty 'id' or 'breed'")):
        load_split(DatasetSpec(str(root), labels_csv="labels.csv"), "train")
    (root / "labels.csv").write_text("id,breed\n")
    with pytest.raises(ValueError, match=_exact(f"{csv} lists no images")):
        load_split(DatasetSpec(str(root), labels_csv="labels.csv"), "train")


def test_csv_missing_file_fails_or_is_skipped(tmp_path: Path) -> None:
    root = tmp_path / "dogs"
    rows = make_csv_dataset(root, 4)
    with open(root / "labels.csv", "a") as f:
        f.write("ghost,akita\n")
    spec = DatasetSpec(str(root), labels_csv="labels.csv", val_fraction=0.25, test_fraction=0.25)
    split = load_split(spec, "test")
    assert [(r.path, r.reason) for r in split.rejected] == [("train/ghost.jpg", "file not found")]
    settings = dict(data=str(root), labels_csv="labels.csv", val_fraction=0.25, test_fraction=0.25, split="test", **tiny())
    expected = f"{root / 'train' / 'ghost.jpg'}: file not found; remove or fix it, or pass --on-error skip"
    with pytest.raises(ValueError, match=_exact(expected)):
        extract(ExtractConfig(**settings), progress=False)
    result = extract(ExtractConfig(**settings, on_error="skip"), progress=False)
    assert result.skipped == [("train/ghost.jpg", "file not found")]
    with read_cache(result.path) as c:
        assert c.skipped == [("train/ghost.jpg", "file not found")]
        assert c.paths == split.paths and len(c) == 3
        assert "train/ghost.jpg" not in c.paths
    assert {p for s in ("train", "val", "test") for p in load_split(spec, s).paths} == {f"train/{i}.jpg" for i in rows}


def test_csv_dataset_extracts_end_to_end(tmp_path: Path) -> None:
    rows = make_csv_dataset(tmp_path / "dogs")
    for split, n in (("test", 3), ("train", 24)):
        result = extract(ExtractConfig(data=str(tmp_path / "dogs"), labels_csv="labels.csv", split=split, **tiny()), progress=False)
        assert result.status == "extracted" and result.n_images == n and result.skipped == []
        assert result.path == Path(f"features/dogs/mobilenet_v2-none/classifier-input/{split}.h5")
        with read_cache(result.path) as c:
            assert c.classes == ["akita", "beagle", "corgi"]
            assert c.paths == load_split(DatasetSpec(str(tmp_path / "dogs"), labels_csv="labels.csv"), split).paths
            assert [c.classes[y] for y in c.labels] == [rows[Path(p).stem] for p in c.paths]
            assert c.features().shape == (n, 1280) and np.isfinite(c.features()).all()
            assert c.attrs["carved"] == {"from": "labels.csv", "test_fraction": 0.1, "val_fraction": 0.1, "seed": 0}


# ---------------------------------------------------------------- fingerprint


def _fingerprint(root: Path, split: str = "test") -> str:
    return load_split(DatasetSpec(str(root)), split).fingerprint


def test_fingerprint_follows_sizes_and_members_only(image_folder: Path) -> None:
    base = _fingerprint(image_folder)
    assert re.fullmatch(r"[0-9a-f]{64}", base)
    assert _fingerprint(image_folder) == base
    img = image_folder / "test" / "bee" / "001.png"
    # Same bytes count, other content, new mtime: by design the fingerprint does not read the pixels.
    data = bytearray(img.read_bytes())
    data[-20] ^= 0xFF
    img.write_bytes(bytes(data))
    os.utime(img, (1, 1))
    assert _fingerprint(image_folder) == base
    # An image whose size changes.
    img.write_bytes(img.read_bytes() + b"\0")
    grown = _fingerprint(image_folder)
    assert grown != base
    # An added image.
    Image.new("RGB", (8, 8)).save(image_folder / "test" / "cat" / "new.png")
    added = _fingerprint(image_folder)
    assert added not in (base, grown)
    # Files that are rejected are not members.
    (image_folder / "test" / "cat" / "notes.txt").write_text("x")
    assert _fingerprint(image_folder) == added
    # Another split of the same folder has its own fingerprint, and other images don't move it.
    train = _fingerprint(image_folder, "train")
    (image_folder / "test" / "cat" / "new.png").unlink()
    assert _fingerprint(image_folder, "train") == train and _fingerprint(image_folder) == grown


def test_fingerprint_follows_labels(image_folder: Path) -> None:
    base = _fingerprint(image_folder)
    os.replace(image_folder / "test" / "ant" / "002.png", image_folder / "test" / "bee" / "009.png")
    moved = _fingerprint(image_folder)
    os.replace(image_folder / "test" / "bee" / "009.png", image_folder / "test" / "ant" / "002.png")
    assert moved != base and _fingerprint(image_folder) == base


@pytest.mark.parametrize("layout", ["carved val", "own val", "csv"])
def test_several_splits_at_once_equal_one_at_a_time_with_each_folder_scanned_once(tmp_path: Path, layout: str,
                                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.data

    counts = {"train": 8, "test": 3} if layout != "own val" else {"train": 8, "val": 3, "test": 3}
    root = make_image_folder(tmp_path / "ds", counts)
    spec = DatasetSpec(root=str(root))
    if layout == "csv":
        rows = [f"{p.relative_to(root / 'train').as_posix()[:-4]},{p.parent.name}" for p in sorted((root / "train").rglob("*.png"))]
        (root / "labels.csv").write_text("id,breed\n" + "\n".join(rows) + "\n")
        spec = DatasetSpec(root=str(root), labels_csv="labels.csv", extension=".png")
    alone = {s: load_split(spec, s) for s in ("train", "val", "test")}
    scanned: list[str] = []
    real_folder, real_csv = pipeline.data._scan_folder, pipeline.data._scan_csv
    monkeypatch.setattr(pipeline.data, "_scan_folder", lambda r, scan, c: scanned.append(scan) or real_folder(r, scan, c))
    monkeypatch.setattr(pipeline.data, "_scan_csv", lambda sp: scanned.append("csv") or real_csv(sp))
    together = pipeline.data.load_splits(spec, ["train", "val", "test"])
    for s, one in alone.items():
        assert (together[s].paths, together[s].labels.tolist(), together[s].fingerprint, together[s].carved) == \
               (one.paths, one.labels.tolist(), one.fingerprint, one.carved)
    assert sorted(scanned) == {"carved val": ["test", "train"], "own val": ["test", "train", "val"], "csv": ["csv"]}[layout]
