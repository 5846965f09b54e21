"""Settings: the dataclasses validate their values, and pipeline.toml is checked key by key and type by type."""

from __future__ import annotations

import dataclasses

import pytest

from pipeline.config import BACKBONE_AND_DATASET, AuditConfig, ExtractConfig, FinetuneConfig, HeadConfig
from pipeline.settings_file import load_config, settings_from


def _toml(tmp_path, text: str):
    path = tmp_path / "pipeline.toml"
    path.write_text(text)
    return load_config(path), str(path)


@pytest.mark.parametrize("text, message", [
    ('[extract]\namp = "no"\n', r'\[extract\] amp in .*: expected true or false, got \'no\''),
    ('[extract]\nbatch_size = "64"\n', r"batch_size in .*: expected an integer, got '64'"),
    ('[extract]\nbatch_size = true\n', r"batch_size in .*: expected an integer, got True"),
    ('[extract]\nlayers = "layer4"\n', r"layers in .*: expected a list of strings, got 'layer4'"),
    ('[extract]\nmean = [0.5, "a", 0.5]\n', r"mean in .*: expected a list of numbers, got \[0.5, 'a', 0.5\]"),
    ('[extract]\nbatchsize = 64\n', r"unknown setting\(s\) \['batchsize'\] \(did you mean batch_size\?\)"),
])
def test_settings_of_the_wrong_type_or_name_are_named(tmp_path, text, message):
    config, source = _toml(tmp_path, text)
    with pytest.raises(ValueError, match=message):
        settings_from(ExtractConfig, config, "extract", {}, source=source)


def test_a_misspelt_section_is_an_error_with_the_nearest_name(tmp_path):
    with pytest.raises(ValueError, match=r"unknown section \[extrakt\] \(did you mean \[extract\]\?\)"):
        _toml(tmp_path, "[extrakt]\nmodel = 'resnet18'\n")


def test_numbers_fit_float_fields_and_lists_become_tuples(tmp_path):
    config, source = _toml(tmp_path, "[extract]\nmean = [0, 0.5, 1]\nval_fraction = 0.2\namp = false\nlayers = ['layer3', 'layer4']\n")
    settings = settings_from(ExtractConfig, config, "extract", {"split": "val"}, source=source)
    assert settings.mean == (0, 0.5, 1) and settings.val_fraction == 0.2 and settings.amp is False
    assert settings.layers == ("layer3", "layer4") and settings.split == "val"


def test_command_line_values_override_the_file_and_none_means_not_given(tmp_path):
    config, source = _toml(tmp_path, "[extract]\nbatch_size = 16\nmodel = 'resnet18'\n")
    settings = settings_from(ExtractConfig, config, "extract", {"batch_size": 8, "model": None, "layers": ()}, source=source)
    assert (settings.batch_size, settings.model, settings.layers) == (8, "resnet18", ())


def test_finetune_inherits_the_dataset_and_backbone_of_extract(tmp_path):
    config, source = _toml(tmp_path, "[extract]\ndata = 'photos'\nmodel = 'resnet18'\nbatch_size = 7\nsplit_seed = 3\n"
                                     "[finetune]\nepochs = 2\n")
    settings = settings_from(FinetuneConfig, config, "finetune", {}, source=source)
    assert (settings.data, settings.model, settings.split_seed, settings.epochs) == ("photos", "resnet18", 3, 2)
    assert settings.batch_size != 7  # extraction's batch size is not a fine-tune setting
    assert settings.dataset.root == "photos"


def test_the_shared_fields_are_declared_once():
    extract = {f.name for f in dataclasses.fields(ExtractConfig)}
    finetune = {f.name for f in dataclasses.fields(FinetuneConfig)}
    assert set(BACKBONE_AND_DATASET) <= extract & finetune
    assert {"data", "labels_csv", "split_seed", "model", "weights", "crop", "mean"} <= set(BACKBONE_AND_DATASET)


@pytest.mark.parametrize("cls, kwargs, message", [
    (ExtractConfig, {"crop": 0}, "crop must be at least 1, got 0"),
    (ExtractConfig, {"std": (1.0, 0.0, 1.0)}, "std must be positive"),
    (ExtractConfig, {"mean": (0.5, 0.5)}, r"mean takes three numbers"),
    (ExtractConfig, {"val_fraction": 1.5}, "val_fraction must lie strictly between 0 and 1"),
    (FinetuneConfig, {"resize": 0}, "resize must be at least 1"),
    (HeadConfig, {"pca": 0}, "pca must be at least 1"),
    (HeadConfig, {"exclude_top": -1}, "exclude_top must be at least 0"),
    (AuditConfig, {"folds": 1}, "folds must be at least 2"),
    (AuditConfig, {"threshold": 1.2}, r"threshold is a cosine similarity in \[-1, 1\]"),
    (AuditConfig, {"clf": "forest"}, "clf must be one of linear, logreg"),
    (AuditConfig, {"value": 0}, "value must be positive"),
])
def test_impossible_values_are_refused_before_any_work(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)


# ---------------------------------------------------------------- pipeline init, and finding what exists


def test_init_writes_a_settings_file_that_the_other_commands_read(tmp_path):
    from click.testing import CliRunner

    from pipeline.cli import cli
    from tests.conftest import make_image_folder

    make_image_folder(tmp_path / "photos", {"train": 4, "val": 2})
    runner = CliRunner()
    result = runner.invoke(cli, ["init", "photos", "--model", "mobilenet_v2", "--weights", "none", "--crop", "32", "--resize", "36"])
    assert result.exit_code == 0, result.output
    config = load_config("pipeline.toml")
    assert config == {"extract": {"data": "photos", "model": "mobilenet_v2", "weights": "none", "resize": 36, "crop": 32}}
    again = runner.invoke(cli, ["init", "photos"])
    assert again.exit_code == 1 and "pipeline.toml exists; pass --force to replace it" in again.output
    # The other commands take the dataset, model and weights from it.
    result = runner.invoke(cli, ["extract", "--split", "train", "--split", "val", "--batch-size", "4", "--workers", "0",
                                 "--engine", "eager", "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "features/photos/mobilenet_v2-none/classifier-input/train.h5" in result.output
    result = runner.invoke(cli, ["fit-head", "--clf", "logreg", "--refine", "0"])
    assert result.exit_code == 0, result.output
    # A cache that does not exist is named along with the ones that do.
    result = runner.invoke(cli, ["fit-head", "--clf", "logreg", "--model", "resnet18"])
    assert result.exit_code == 1
    assert "no feature cache at features/photos/resnet18-none/avgpool-output/train.h5" in result.output
    assert "caches of this dataset: features/photos/mobilenet_v2-none/classifier-input/train.h5" in result.output


def test_missing_weights_name_the_weights_available_here(tmp_path, monkeypatch):
    import torch

    from pipeline.backbones import WeightsUnavailableError, available_weights, load_backbone

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert available_weights("resnet18") == []
    with pytest.raises(WeightsUnavailableError, match="resnet18 IMAGENET1K_V1 weights are not in") as error:
        load_backbone("resnet18", "DEFAULT")
    assert "available here" not in str(error.value)
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / "mobilenet_v2-b0353104.pth").write_bytes(b"")  # only its presence is asked
    assert torch.hub.get_dir() == str(tmp_path / "torch" / "hub")
    assert available_weights("mobilenet_v2") == ["IMAGENET1K_V1"]
    with pytest.raises(WeightsUnavailableError, match=r"Weights of mobilenet_v2 available here: --weights IMAGENET1K_V1\."):
        load_backbone("mobilenet_v2", "IMAGENET1K_V2")


def test_the_audit_section_is_read_and_checked(tmp_path):
    config, source = _toml(tmp_path, "[audit]\nclf = 'knn'\nthreshold = 0.9\nfolds = 3\n")
    settings = settings_from(AuditConfig, config, "audit", {"folds": 4}, source=source)
    assert (settings.clf, settings.threshold, settings.folds) == ("knn", 0.9, 4)
    config, source = _toml(tmp_path, "[audit]\nthreshhold = 0.9\n")
    with pytest.raises(ValueError, match=r"\[audit\] .*unknown setting\(s\) \['threshhold'\] \(did you mean threshold\?\)"):
        settings_from(AuditConfig, config, "audit", {}, source=source)


def test_two_folders_with_the_same_name_keep_their_own_caches_heads_runs_and_reports(tmp_path):
    import hashlib
    import json
    from pathlib import Path

    from click.testing import CliRunner

    from pipeline import layout
    from pipeline.cli import cli
    from pipeline.finetune.loop import run_dir
    from tests.conftest import make_image_folder

    a = make_image_folder(tmp_path / "a" / "photos", {"train": 10, "test": 2})
    b = make_image_folder(tmp_path / "b" / "photos", {"train": 11, "test": 3}, seed=1)
    tiny = ["--weights", "none", "--crop", "32", "--resize", "36", "--batch-size", "4", "--workers", "0", "--engine", "eager", "--device", "cpu"]
    runner = CliRunner()
    outputs = {}
    for data in (a, b):  # the second is neither refused ("made with other settings") nor mixed with the first
        result = runner.invoke(cli, ["extract", "--data", str(data), *tiny, "--split", "train", "--split", "val", "--split", "test", "--no-progress"])
        assert result.exit_code == 0, result.output
        outputs[data] = result.output
        result = runner.invoke(cli, ["fit-head", "--data", str(data), "--weights", "none", "--clf", "logreg", "--refine", "0", "--evaluate"])
        assert result.exit_code == 0, result.output
    second = f"photos-{hashlib.sha256(str(b.resolve()).encode()).hexdigest()[:8]}"
    assert "features/photos/mobilenet_v2-none/classifier-input/train.h5  27 images" in outputs[a]  # 30 minus the carved val
    assert f"features/{second}/mobilenet_v2-none/classifier-input/train.h5  29 images" in outputs[b]
    assert Path("features/photos/.dataset-root").read_text().strip() == str(a.resolve())
    for key, data in (("photos", a), (second, b)):
        head = json.loads(Path(f"features/{key}/mobilenet_v2-none/classifier-input/heads/logreg.json").read_text())
        assert head["train_cache"]["path"].startswith(str(Path("features", key).resolve()))
        assert layout.dataset_key("features", data) == key
    # A fine-tune and a report of b claim their own names under runs/ and reports/ (b is first there, so plain).
    from pipeline.config import FinetuneConfig

    assert run_dir(FinetuneConfig(data=str(b), weights="none")).parts[:2] == ("runs", "photos")
    layout.claim_dataset("runs", b)
    assert run_dir(FinetuneConfig(data=str(a), weights="none")).parts[:2] == ("runs", f"photos-{hashlib.sha256(str(a.resolve()).encode()).hexdigest()[:8]}")


def test_a_run_that_loses_the_claim_of_its_name_to_another_folder_says_so_and_the_next_run_gets_its_own(tmp_path, monkeypatch):
    import pytest

    from pipeline import layout

    a, b = tmp_path / "a" / "photos", tmp_path / "b" / "photos"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    layout.claim_dataset("features", a)
    real, looks = layout.dataset_key, []
    # b looked while the name was still free (its first look), and a's claim landed before b's.
    monkeypatch.setattr(layout, "dataset_key", lambda top, root: "photos" if not looks.append(1) and len(looks) == 1 else real(top, root))
    with pytest.raises(ValueError, match=r"^features/photos was just claimed by another dataset folder of the same name; run the command again and it will use features/photos-[0-9a-f]{8}$"):
        layout.claim_dataset("features", b)
    monkeypatch.setattr(layout, "dataset_key", real)
    assert layout.claim_dataset("features", b).name == real("features", b) != "photos"
    assert layout.claim_dataset("features", a).name == "photos"
