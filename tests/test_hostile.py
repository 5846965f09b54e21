"""Silently wrong results and unclear errors (issue 17): overlapping splits, bit rot in a cache, NaN pixels,
dangling and escaping symbolic links, malformed metadata, absurd declared sizes, and settings of the wrong type.

Each kind is tried on more than one instance; every error names the file (or setting) and what is wrong.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import pipeline.cache
from pipeline import ExtractConfig, HeadConfig, extract, fit_head, read_cache
from pipeline.artifacts import load_finetuned, load_head
from pipeline.cache import describe
from pipeline.cli import cli
from pipeline.config import DatasetSpec, FinetuneConfig, ReportConfig
from pipeline.validate import SettingTypeError
from pipeline.data import UnreadableImageError, load_rgb, load_split
from pipeline.evaluate import compare, evaluate
from pipeline.layout import FINETUNED_FORMAT
from pipeline.predict import find_images

from .conftest import single_threaded, tiny
from .test_fit import blobs, make_caches, settings_for, write_features

TAP = "classifier:input"


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with single_threaded():
        yield


def _fit(c, **kw: object) -> Path:
    config = HeadConfig(clf="logreg", grid=(1.0,), refine=0, train_cache=str(c.train), val_cache=str(c.val))
    return fit_head(config, out="heads/h", **kw).path


def _error(args: list[str]) -> str:
    run = CliRunner().invoke(cli, [str(a) for a in args])
    assert run.exit_code == 1 and run.output.startswith("Error: ") and "Traceback" not in run.output, run.output
    return run.output


# ---------------------------------------------------------------- splits that overlap


def test_fit_head_refuses_a_val_cache_that_shares_train_images_unless_allowed() -> None:
    c = make_caches(k=3, splits=("train", "test"))
    X, y = blobs([10, 10, 10], seed=1)
    with read_cache(c.train) as train:
        shared = train.paths[:7]
    paths = shared + [f"val/extra/{i}.png" for i in range(len(y) - 7)]
    c.val = write_features(Path("features/val.h5"), X, y, c.classes, paths=paths)
    with pytest.raises(ValueError, match=r"train.h5 \(train\) and .*val.h5 \(val\) share 7 images \(23% of the smaller\), "
                                         r"e.g. train/c0/000.png; .* pass --allow-overlap"):
        _fit(c)
    assert not Path("heads/h.json").exists()
    with pytest.warns(UserWarning, match="share 7 images"):
        head = _fit(c, allow_overlap=True)
    assert "share 7 images" in json.loads(head.read_text())["overlap"][0]


def test_train_and_val_carved_with_different_seeds_are_refused(image_folder: Path) -> None:
    """The issue's case: val carved from train with another seed shares most of train's images."""
    base = dict(data=str(image_folder), **tiny())
    train = extract(ExtractConfig(split="train", split_seed=0, **base), progress=False).path
    val = extract(ExtractConfig(split="val", split_seed=1, output="other/val.h5", **base), progress=False).path
    with pytest.raises(ValueError, match=r"\(train\) and other/val.h5 \(val\) share [1-9] images .*e.g. .*/ds/train/\w+/\d+.png"):
        fit_head(HeadConfig(clf="logreg", grid=(1.0,), train_cache=str(train), val_cache=str(val)), out="heads/h")
    # The same seed carves disjoint splits.
    val0 = extract(ExtractConfig(split="val", split_seed=0, **base), progress=False).path
    assert fit_head(HeadConfig(clf="logreg", grid=(1.0,), train_cache=str(train), val_cache=str(val0)), out="heads/h").status == "fitted"


def test_evaluate_refuses_the_split_the_head_was_fitted_or_chosen_on() -> None:
    c = make_caches(k=3)
    head = _fit(c)
    for cache, role in ((c.train, "train"), (c.val, "val")):
        with pytest.raises(ValueError, match=rf"the {role} and test caches are the same file, .*{role}.h5 .*pass --allow-overlap"):
            evaluate(head, cache)
        assert "are the same file" in _error(["evaluate", head, "--test-cache", cache])
    assert not Path("heads/h-test.json").exists()
    with pytest.warns(UserWarning, match="same file"):
        m = evaluate(head, c.train, allow_overlap=True)
    assert m["top1"] > 0.9 and "the train and test caches are the same file" in m["overlap"][0]
    with pytest.warns(UserWarning, match="the val and test caches are the same file"):
        run = CliRunner().invoke(cli, ["evaluate", str(head), "--test-cache", str(c.val), "--allow-overlap"])
    assert run.exit_code == 0, run.output
    assert "overlap" not in evaluate(head, c.test)  # the real test split is disjoint


def test_evaluate_refuses_a_test_cache_sharing_some_training_images() -> None:
    c = make_caches(k=3)
    head = _fit(c)
    X, y = blobs([10, 10, 10], seed=2)
    with read_cache(c.train) as train:
        paths = train.paths[-3:] + [f"test/new/{i}.png" for i in range(len(y) - 3)]
    mixed = write_features(Path("other/test.h5"), X, y, c.classes, split="test", paths=paths)
    with pytest.raises(ValueError, match=r"train.h5 \(train\) and other/test.h5 \(test\) share 3 images .*e.g. train/c2/"):
        evaluate(head, mixed)


def test_a_copy_of_the_train_cache_is_recognised_when_the_original_is_gone() -> None:
    c = make_caches(k=3)
    head = _fit(c)
    Path("copy").mkdir()
    shutil.copy(c.train, "copy/test.h5")
    c.train.unlink()
    with pytest.raises(ValueError, match=r"copy/test.h5 holds the train split that .*h.json was fitted on \(the same dataset fingerprint"):
        evaluate(head, "copy/test.h5")


def test_caches_of_different_dataset_folders_do_not_overlap() -> None:
    """The same relative paths under two dataset folders are different images."""
    c = make_caches(k=3, splits=("train",))
    X, y = blobs([10, 10, 10], seed=1)
    with read_cache(c.train) as train:
        paths = train.paths[:30]
    settings = settings_for("val")
    write_features(Path("features/val.h5"), X, y, c.classes, paths=paths, attrs={"data_root": "/elsewhere"}, settings=settings)
    c.val = Path("features/val.h5")
    with h5py.File(c.train, "r+") as f:
        f.attrs["data_root"] = "/data/ds"
    assert _fit(c).exists()


# ---------------------------------------------------------------- bit rot in a cache


def _flip_chunk(path: Path, name: str, chunk: int) -> None:
    """Change bytes of one stored chunk directly in the file, as bit rot would (h5py writes would update the checksum)."""
    with h5py.File(path, "r") as f:
        info = f[name].id.get_chunk_info(chunk)
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset + 3)
        byte = fh.read(1)
        fh.seek(info.byte_offset + 3)
        fh.write(bytes([byte[0] ^ 0xFF]))


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline.shards, "_CHUNK_BYTES", 3 * 32 * 4)  # 3 rows of 32 float32 per chunk


def test_a_flipped_byte_in_the_features_is_named_with_its_rows(small_chunks: None) -> None:
    c = make_caches(k=3)
    with read_cache(c.train) as cache:
        assert cache.dataset().fletcher32 and cache.dataset().chunks[0] == 3
    _flip_chunk(c.train, f"features/{TAP}", 4)
    message = rf"train.h5 is damaged: rows 12-14 of features/{TAP} fail their checksum: the file changed on disk"
    with read_cache(c.train) as cache:
        with pytest.raises(ValueError, match=message):
            cache.features()
        with pytest.raises(ValueError, match=message):
            cache.dataset()[np.array([1, 13])]
        cache.dataset()[:12]  # the other chunks still read
    with pytest.raises(ValueError, match=message):
        _fit(c)
    with pytest.raises(ValueError, match=message):  # the streaming reader too
        fit_head(HeadConfig(clf="linear", grid=(1e-3,), epochs=1, stream=True, train_cache=str(c.train), val_cache=str(c.val)), out="heads/s")
    assert "fletcher32 checksums" in describe(c.train)


def test_a_flipped_byte_in_the_labels_is_caught(small_chunks: None) -> None:
    c = make_caches(k=3)
    _flip_chunk(c.test, "labels", 0)
    with read_cache(c.test) as cache, pytest.raises(ValueError, match=r"test.h5 is damaged: rows 0-\d+ of labels fail their checksum"):
        cache.labels


def test_a_cache_written_before_the_checksums_still_reads() -> None:
    c = make_caches(k=3)
    with h5py.File(c.train, "r+") as f:
        for name in (f"features/{TAP}", "labels"):
            data = f[name][()]
            del f[name]
            f.create_dataset(name, data=data, chunks=True if data.ndim > 1 else None)
    with read_cache(c.train) as cache:
        assert not cache.dataset().fletcher32
        np.testing.assert_array_equal(cache.features(), c.X_train)
    assert _fit(c).exists()


# ---------------------------------------------------------------- float images with NaN or inf pixels


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_float_images_with_non_finite_pixels_are_unreadable(tmp_path: Path, bad: float) -> None:
    arr = np.full((6, 8), 0.5, np.float32)
    arr[2, 5] = bad
    Image.fromarray(arr, mode="F").save(tmp_path / "x.tif")
    with pytest.raises(UnreadableImageError, match=r"x.tif: floating-point image with 1 of 48 pixels NaN or infinite \(first at x=5, y=2"):
        load_rgb(tmp_path / "x.tif")
    from pipeline.data import ImageDataset

    pos, x, reason = ImageDataset(tmp_path, ["x.tif"], lambda im: im)[0]
    assert x is None and "NaN or infinite" in reason
    arr[2, 5] = 0.25
    Image.fromarray(arr, mode="F").save(tmp_path / "ok.tif")
    assert np.asarray(load_rgb(tmp_path / "ok.tif"))[0, 0, 0] == 128  # a finite 0..1 image is scaled, not blackened


# ---------------------------------------------------------------- symbolic links


def test_predict_lists_broken_links_and_other_non_files_as_skipped(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    os.symlink(folder / "gone.png", folder / "sub" / "dangling.png")
    os.symlink("loop.png", folder / "loop.png")
    os.mkfifo(folder / "pipe.png")
    paths, rejected = find_images([folder])
    assert paths == [str(folder / "a.png")]
    why = {Path(p).name: r for p, r in rejected}
    assert why["dangling.png"] == f"broken symbolic link (its target {folder / 'gone.png'} does not exist)"
    assert why["loop.png"].startswith("broken symbolic link to loop.png")
    assert why["pipe.png"] == "not a regular file"
    assert find_images([folder / "sub" / "dangling.png"])[1][0][1].startswith("broken symbolic link")
    assert find_images(str(folder))[0] == paths  # one folder given as a string is one folder, not its letters


def test_a_broken_link_in_a_dataset_folder_is_named(image_folder: Path) -> None:
    os.symlink(image_folder / "nowhere.png", image_folder / "test" / "ant" / "zz.png")
    split = load_split(DatasetSpec(root=str(image_folder)), "test")
    assert [(r.path, r.reason) for r in split.rejected] == [
        ("test/ant/zz.png", f"broken symbolic link (its target {image_folder / 'nowhere.png'} does not exist)")]


def _csv_dataset(root: Path, names: list[str]) -> Path:
    (root / "train").mkdir(parents=True)
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    for n in names:
        (root / "train" / f"{n}.jpg").write_bytes(png.getvalue())
    return root


def test_csv_symlinks_leading_outside_the_image_root_are_refused(tmp_path: Path) -> None:
    root = _csv_dataset(tmp_path / "ds", list("abcdefghijklmnopqrst"))
    secret = tmp_path / "secret"
    (secret / "dir").mkdir(parents=True)
    (secret / "z9.jpg").write_bytes(b"private")
    (secret / "dir" / "t.jpg").write_bytes(b"private")
    spec = DatasetSpec(root=str(root), labels_csv="labels.csv")
    rows = "id,breed\n" + "".join(f"{n},{'xy'[i % 2]}\n" for i, n in enumerate("abcdefghijklmnopqrst"))
    os.symlink(root / "train" / "a.jpg", root / "train" / "inside.jpg")  # a link within the root is fine
    (root / "labels.csv").write_text(rows + "inside,x\n")
    assert "train/inside.jpg" in load_split(spec, "train").paths + load_split(spec, "val").paths + load_split(spec, "test").paths
    os.symlink(secret / "z9.jpg", root / "train" / "z9.jpg")
    (root / "labels.csv").write_text(rows + "z9,x\n")
    with pytest.raises(ValueError, match=r"labels.csv line 22: image path 'z9.jpg' leads outside the image root .*/ds/train \(through a symbolic link, to .*/secret/z9.jpg\)"):
        load_split(spec, "train")
    os.symlink(secret / "dir", root / "train" / "linked")  # a linked folder
    (root / "labels.csv").write_text(rows + "linked/t,x\n")
    with pytest.raises(ValueError, match=r"line 22: image path 'linked/t.jpg' leads outside the image root"):
        load_split(spec, "test")


# ---------------------------------------------------------------- CSV quotes


@pytest.mark.parametrize("text, message", [
    ('id,breed\na,x\nb,y\n\n"c,x\nd,y\ne,x\nf,y\n', r"line 5: a quote opened on this line is never closed: the field runs to the end of the file, so 4 lines became one record"),
    ('id,breed\na,x\nb,"y\nc,x\nd,y"\ne,x\nf,y\n', r"line 3: a quote opened on this line is closed only on line 5, so 3 lines became one record"),
])
def test_an_unbalanced_quote_in_a_labels_file_names_its_line(tmp_path: Path, text: str, message: str) -> None:
    root = _csv_dataset(tmp_path / "ds", list("abcdef"))
    (root / "labels.csv").write_text(text)
    with pytest.raises(ValueError, match=r"labels.csv " + message):
        load_split(DatasetSpec(root=str(root), labels_csv="labels.csv"), "train")


# ---------------------------------------------------------------- malformed metadata


def _set_attr(path: Path, key: str, value: object) -> Path:
    with h5py.File(path, "r+") as f:
        f.attrs[key] = value
    return path


@pytest.mark.parametrize("key, value, message", [
    ("settings", "{not json", r"attribute 'settings' should be a JSON object of settings, found '\{not json'"),
    ("settings", "[1, 2]", r"attribute 'settings' should be a JSON object of settings, found '\[1, 2\]'"),
    ("preprocess", "resize=36", r"attribute 'preprocess' should be a JSON object, found 'resize=36'"),
    ("data_root", 5, r"attribute 'data_root' should be a folder name, found 5"),
])
def test_cache_attributes_that_are_not_what_readers_expect_are_named(key: str, value: object, message: str) -> None:
    c = make_caches(k=3, splits=("train",))
    _set_attr(c.train, key, value)
    with pytest.raises(ValueError, match=r"train.h5 is damaged: " + message):
        read_cache(c.train)
    assert message.split(" should")[0].replace("\\", "") in _error(["info", c.train])


def _replant(meta_path: Path, artifact: Path, data: bytes) -> None:
    """Replace an artifact and record its new digest, so that only its content is wrong."""
    artifact.write_bytes(data)
    meta = json.loads(meta_path.read_text())
    meta["artifact_sha256"] = hashlib.sha256(data).hexdigest()
    meta_path.write_text(json.dumps(meta))


@pytest.mark.parametrize("drop, change, message", [
    ("mean", {}, r"h\.\w+\.pt is not a whole torch head: it lacks the field 'mean' that its 'standardize' step needs"),
    ("best_epoch", {}, r"it lacks the field 'best_epoch' that its 'linear' step needs"),
    (None, {"weight": [[1.0]]}, r"its field 'weight' should be a Tensor, found a list"),
    (None, {"steps": "standardize"}, r"its field 'steps' should be a list of step names, found 'standardize'"),
])
def test_a_torch_head_without_its_expected_keys_is_named(drop: str | None, change: dict, message: str) -> None:
    c = make_caches(k=3, splits=("train", "val"))
    head = fit_head(HeadConfig(clf="linear", grid=(1e-3,), epochs=2, train_cache=str(c.train), val_cache=str(c.val)), out="heads/h").path
    artifact = head.with_name(json.loads(head.read_text())["artifact"])  # content-named: h.<digest>.pt
    state = torch.load(artifact, weights_only=True)
    state.pop(drop, None)
    state.update(change)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    _replant(head, artifact, buffer.getvalue())
    with pytest.raises(ValueError, match=message):
        load_head(head)


def _edit(path: Path, drop: str | None = None, **fields: object) -> None:
    meta = json.loads(path.read_text())
    meta.pop(drop, None)
    meta.update(fields)
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize("drop, fields, message", [
    ("val_accuracy", {}, r"h.json lacks the field 'val_accuracy'"),
    (None, {"val_accuracy": "high"}, r"h.json: the field 'val_accuracy' should be a number, found 'high'"),
    (None, {"value": None}, r"h.json: the field 'value' should be a number, found None"),
])
def test_compare_names_a_head_file_and_its_missing_field(drop: str | None, fields: dict, message: str) -> None:
    c = make_caches(k=3, splits=("train", "val"))
    head = _fit(c)
    _edit(head, drop, **fields)
    with pytest.raises(ValueError, match=message):
        compare("heads")
    assert "Error: " in _error(["compare", "heads"])


@pytest.mark.parametrize("drop, fields, message", [
    ("tap", {}, r"h.json lacks the field 'tap'"),
    ("classes", {}, r"h.json lacks the field 'classes'"),
    (None, {"features": "mobilenet"}, r"h.json: the field 'features' should be an object, found 'mobilenet'"),
    (None, {"train_cache": {"rows": 3}}, r"h.json lacks the field 'train_cache.path'"),
    (None, {"artifact_sha256": 5}, r"h.json is not a whole pipeline head: the field 'artifact_sha256' is not a string \(5\)"),
])
def test_evaluate_names_a_head_file_and_its_missing_field(drop: str | None, fields: dict, message: str) -> None:
    c = make_caches(k=3)
    head = _fit(c)
    _edit(head, drop, **fields)
    with pytest.raises(ValueError, match=message):
        evaluate(head)


def _finetuned(meta: dict, state: object) -> Path:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    Path("run").mkdir(exist_ok=True)
    Path("run/model.pt").write_bytes(buffer.getvalue())
    record = {"format": FINETUNED_FORMAT, "artifact": "model.pt", "artifact_sha256": hashlib.sha256(buffer.getvalue()).hexdigest(), **meta}
    Path("run/model.json").write_text(json.dumps(record))
    return Path("run/model.json")


def test_a_fine_tuned_model_without_its_expected_fields_is_named() -> None:
    pre = {"resize": 36, "crop": 32, "mean": [0.5] * 3, "std": [0.5] * 3}
    with pytest.raises(ValueError, match=r"model.json lacks the field 'preprocess.crop'"):
        load_finetuned(_finetuned({"model": "resnet18", "classes": ["a", "b"], "preprocess": {"resize": 36}}, {"state_dict": {}}))
    with pytest.raises(ValueError, match=r"model.json: the field 'classes' should be a list of class names, found 'ab'"):
        load_finetuned(_finetuned({"model": "resnet18", "classes": "ab", "preprocess": pre}, {"state_dict": {}}))
    with pytest.raises(ValueError, match=r"model.pt is not a whole fine-tuned model: its field 'state_dict' \(the weights\) is missing"):
        load_finetuned(_finetuned({"model": "resnet18", "classes": ["a", "b"], "preprocess": pre}, {"weights": {}}))
    with pytest.raises(ValueError, match=r"model.pt does not fit resnet18 with 2 classes \(.*size mismatch"):
        load_finetuned(_finetuned({"model": "resnet18", "classes": ["a", "b"], "preprocess": pre}, {"state_dict": {"fc.bias": torch.zeros(7)}}))


# ---------------------------------------------------------------- absurd declared sizes


def _declare_rows(path: Path, n: int, names: tuple[str, ...]) -> None:
    """Replace datasets by chunked ones of ``n`` rows with no chunk written: a tiny file declaring a huge array."""
    text = h5py.string_dtype()
    with h5py.File(path, "r+") as f:
        for name in names:
            d = f[name]
            dtype = text if h5py.check_string_dtype(d.dtype) else d.dtype
            shape, chunks = (n, *d.shape[1:]), (min(n, 1024), *d.shape[1:])
            del f[name]
            f.create_dataset(name, shape=shape, dtype=dtype, chunks=chunks)
        f.attrs["n_rows"] = n


@pytest.mark.parametrize("n, names, message", [
    (50_000_000, ("labels", "paths", "index", f"features/{TAP}"), r"labels declares 50000000 int64 values \(381.5 MiB\), more than the whole file"),
    (12, (f"features/{TAP}",), None),  # unwritten but small: allowed by size, zeros on read
])
def test_a_small_file_declaring_a_huge_array_is_refused_before_allocating(n: int, names: tuple[str, ...], message: str | None) -> None:
    c = make_caches(k=3, n=(4, 2, 2), splits=("train",))
    _declare_rows(c.train, n, names)
    assert c.train.stat().st_size < 200_000
    if message is None:
        with read_cache(c.train) as cache:
            assert cache.features().shape == (12, 32)
        return
    with pytest.raises(ValueError, match=r"train.h5 is damaged: " + message):
        read_cache(c.train)
    assert "more than the whole file" in _error(["info", c.train])


def test_features_larger_than_the_memory_available_are_not_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    c = make_caches(k=3, splits=("train",))
    monkeypatch.setattr(pipeline.cache, "available_memory", lambda: 1000)
    with read_cache(c.train) as cache, pytest.raises(ValueError, match=rf"features/{TAP} takes 7.5 KiB, more than the 1000 bytes of memory available; read it in blocks"):
        cache.features()


# ---------------------------------------------------------------- pipeline info on odd attributes


def test_info_caps_a_huge_attribute_and_names_a_wrongly_typed_one() -> None:
    c = make_caches(k=3, splits=("train",))
    _set_attr(c.train, "dataset", "x" * 3_000_000)
    _set_attr(c.train, "images_per_s", "fast")
    _set_attr(c.train, "world_size", "2")
    _set_attr(c.train, "versions", json.dumps({f"lib{i}": "1.0" * 100 for i in range(1000)}))
    run = CliRunner().invoke(cli, ["info", str(c.train)])
    assert run.exit_code == 0, run.output
    assert len(run.output) < 4000 and "(3000000 characters)" in run.output
    assert f"'fast' (attribute 'images_per_s' of {c.train} is not a number)" in run.output
    assert max(len(line) for line in run.output.splitlines()) < 400


# ---------------------------------------------------------------- settings of the wrong type


@pytest.mark.parametrize("make, message", [
    (lambda: ExtractConfig(layers="layer4"), r"ExtractConfig.layers: expected a list of strings, got 'layer4'"),
    (lambda: ExtractConfig(amp="no"), r"ExtractConfig.amp: expected true or false, got 'no'"),
    (lambda: ExtractConfig(batch_size=64.0), r"ExtractConfig.batch_size: expected an integer, got 64.0"),
    (lambda: ExtractConfig(mean=0.5), r"ExtractConfig.mean: expected a list of numbers, got 0.5"),
    (lambda: HeadConfig(grid=0.1), r"HeadConfig.grid: expected a list of numbers, got 0.1"),
    (lambda: HeadConfig(subset="100"), r"HeadConfig.subset: expected an integer, got '100'"),
    (lambda: FinetuneConfig(epochs="3"), r"FinetuneConfig.epochs: expected an integer, got '3'"),
    (lambda: FinetuneConfig(targets="test"), r"FinetuneConfig.targets: expected a list of strings, got 'test'"),
    (lambda: ReportConfig(seed=1.5), r"ReportConfig.seed: expected an integer, got 1.5"),
    (lambda: DatasetSpec(root=3), r"DatasetSpec.root: expected a string, got 3"),
    (lambda: extract({"data": "ds"}), r"extract's config must be ExtractConfig\(...\), got a dict: \{'data': 'ds'\}"),
    (lambda: fit_head(HeadConfig(), "ds"), r"fit_head's source must be ExtractConfig\(...\), got a str: 'ds'"),
])
def test_settings_of_the_wrong_type_name_the_setting_the_value_and_what_was_expected(make, message: str) -> None:
    with pytest.raises(SettingTypeError, match=message) as e:
        make()
    assert isinstance(e.value, ValueError) and isinstance(e.value, TypeError)


def test_paths_numpy_integers_and_lists_are_taken_as_what_they_mean(tmp_path: Path) -> None:
    config = ExtractConfig(data=tmp_path, batch_size=np.int64(8), layers=["layer4"], mean=[0, 0.5, 1])
    assert config.data == str(tmp_path) and type(config.batch_size) is int and config.layers == ("layer4",) and config.mean == (0, 0.5, 1)
    assert FinetuneConfig(freeze=2).freeze == "2"
