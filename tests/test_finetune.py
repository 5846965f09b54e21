"""Fine-tuning: the new classifier, freezing, parameter groups and schedules, LP-FT, resume, recipes, and the model file in evaluate, predict and the CLI.

Everything runs on the CPU with random-weight models at 32 px and a few generated images per class.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import numpy as np
import pytest
import torch
import torchvision
from click.testing import CliRunner, Result
from torch import nn

import pipeline.data
from pipeline import ExtractConfig, extract, load_backbone, read_cache
from pipeline.artifacts import TamperedArtifactError, load_head
from pipeline.cli import cli
from pipeline.data import load_rgb
from pipeline.evaluate import evaluate
from pipeline.artifacts import load_finetuned
from pipeline.backbones import replace_classifier
from pipeline.finetune import (
    RECIPES, FinetuneConfig, apply_freeze, backbone_stages, build_model, build_optimizer, build_scheduler, finetune,
    lr_factor, param_groups, set_train_mode, stratified_subset,
)
from pipeline.fit import HeadConfig, fit_head
from pipeline.predict import predict

from .conftest import CLASSES, make_image_folder, tiny

RUN = Path("runs/ds/resnet18-none")


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """One thread: tiny tensors gain nothing from more, a busy 2-core machine stalls, and results stay bitwise repeatable."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def small(data: Path | str = "ds", **overrides: object) -> FinetuneConfig:
    """A fast fine-tune: random-weight ResNet-18 at 32 px on the CPU, AdamW, no workers."""
    base = dict(data=str(data), model="resnet18", weights="none", crop=32, resize=36, batch_size=8, epochs=2, workers=0,
                device="cpu", optimizer="adamw", lr=1e-3, head_lr_mult=1.0, weight_decay=0.0)
    base.update(overrides)
    return FinetuneConfig(**base)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _one_step(model: nn.Module, layer: str, config: FinetuneConfig) -> torch.optim.Optimizer:
    """One optimizer step in train mode on a random batch, as the training loop takes it."""
    opt = build_optimizer(param_groups(model, layer, config.lr, config.head_lr_mult, config.backbone_lr_mult),
                          config.optimizer, config.lr, config.momentum, config.weight_decay)
    set_train_mode(model)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    loss = nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 0]))
    opt.zero_grad()
    loss.backward()
    opt.step()
    return opt


def _in_optimizer(opt: torch.optim.Optimizer) -> set[int]:
    return {id(p) for g in opt.param_groups for p in g["params"]}


# ---------------------------------------------------------------- the new classifier and the stages


@pytest.mark.parametrize("name, layer", [
    ("resnet18", "fc"), ("mobilenet_v2", "classifier.1"), ("mobilenet_v3_small", "classifier.3"), ("efficientnet_b0", "classifier.1"),
    ("convnext_tiny", "classifier.2"), ("vit_b_16", "heads.head"), ("swin_t", "head"), ("densenet121", "classifier"), ("vgg11", "classifier.6"),
])
def test_the_classifier_is_replaced_whatever_the_family(name: str, layer: str) -> None:
    with torch.device("meta"):  # the module tree only
        model = torchvision.models.get_model(name, weights=None)
        in_features = model.get_submodule(layer).in_features
        assert replace_classifier(model, 7) == layer
    new = model.get_submodule(layer)
    assert isinstance(new, nn.Linear) and new.out_features == 7 and new.in_features == in_features
    assert sum(isinstance(m, nn.Linear) and m.out_features == 1000 for m in model.modules()) == 0


def test_classifier_init_is_seeded_and_leaves_the_global_random_state_alone() -> None:
    def fresh() -> nn.Module:
        return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 1000))

    before = torch.get_rng_state()
    a, b, c = fresh(), fresh(), fresh()
    after_build = torch.get_rng_state()
    for model, seed in ((a, 0), (b, 0), (c, 1)):
        replace_classifier(model, 3, "xavier", torch.Generator().manual_seed(seed))
    assert torch.equal(torch.get_rng_state(), after_build) and not torch.equal(before, after_build)
    assert torch.equal(a[2].weight, b[2].weight) and not torch.equal(a[2].weight, c[2].weight)
    assert a[2].weight.abs().max() <= (6 / (8 + 3)) ** 0.5  # xavier_uniform's bound
    normal = fresh()
    replace_classifier(normal, 3, "normal", torch.Generator().manual_seed(0))
    assert torch.all(normal[2].bias == 0.1) and normal[2].weight.std() < 0.02


def test_stages_per_family() -> None:
    with torch.device("meta"):
        resnet, mobilenet, vit = (torchvision.models.get_model(n, weights=None) for n in ("resnet18", "mobilenet_v2", "vit_b_16"))
    assert [s for s, _ in backbone_stages(resnet)] == ["conv1+bn1", "layer1", "layer2", "layer3", "layer4"]
    assert [s for s, _ in backbone_stages(mobilenet)] == [f"features.{i}" for i in range(19)]
    assert [s for s, _ in backbone_stages(vit)] == ["conv_proj", "encoder"]  # the generic fallback


# ---------------------------------------------------------------- freezing and BatchNorm


def test_a_frozen_backbone_does_not_move_and_is_not_in_the_optimizer() -> None:
    config = small(freeze="backbone", lr=1e-2)
    model, _, layer = build_model(config, CLASSES)
    before = _state(model)
    opt = _one_step(model, layer, config)
    head = {id(p) for p in model.fc.parameters()}
    assert _in_optimizer(opt) == head and [g["name"] for g in opt.param_groups] == ["head"]
    after = model.state_dict()
    for key, value in before.items():
        if key.startswith("fc."):
            assert not torch.equal(after[key], value), key
        else:
            assert torch.equal(after[key], value), key  # weights and BatchNorm running statistics alike
    assert not any(m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_freezing_the_first_stages() -> None:
    config = small(freeze="2", lr=1e-2)
    model, _, layer = build_model(config, CLASSES)
    before = _state(model)
    opt = _one_step(model, layer, config)
    frozen = [k for k in before if k.startswith(("conv1.", "bn1.", "layer1."))]
    trained = [k for k in before if k.startswith(("layer2.", "layer3.", "layer4.", "fc.")) and not k.endswith("num_batches_tracked")]
    assert frozen and trained
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in frozen)
    assert all(not torch.equal(after[k], before[k]) for k in trained), [k for k in trained if torch.equal(after[k], before[k])]
    assert _in_optimizer(opt) == {id(p) for n, p in model.named_parameters() if not n.startswith(("conv1.", "bn1.", "layer1."))}
    assert not model.bn1.training and not model.layer1[0].bn2.training and model.layer2[0].bn1.training and model.training
    with pytest.raises(ValueError, match=r"cannot freeze 6 stages: ResNet has 5 \(conv1\+bn1, layer1, layer2, layer3, layer4\); use --freeze backbone"):
        build_model(small(freeze="6"), CLASSES)


def test_batchnorm_statistics_move_when_not_frozen() -> None:
    """The control of the two tests above: the same step without freezing does change the running statistics."""
    config = small(freeze="none", lr=1e-2)
    model, _, layer = build_model(config, CLASSES)
    before = _state(model)
    _one_step(model, layer, config)
    assert not torch.equal(model.bn1.running_mean, before["bn1.running_mean"])
    assert all(m.training for m in model.modules())
    assert apply_freeze(model, "backbone", layer) == ["backbone"] and not set_train_mode(model).bn1.training


# ---------------------------------------------------------------- optimizer and schedule


def test_group_learning_rates_and_optimizer_settings() -> None:
    config = small(optimizer="sgd", lr=0.01, head_lr_mult=10, backbone_lr_mult=0.1, momentum=0.8, weight_decay=1e-3)
    model, _, layer = build_model(config, CLASSES)
    opt = build_optimizer(param_groups(model, layer, config.lr, config.head_lr_mult, config.backbone_lr_mult), "sgd", config.lr, config.momentum, config.weight_decay)
    assert isinstance(opt, torch.optim.SGD)
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["head"]["lr"] == pytest.approx(0.1) and groups["backbone"]["lr"] == pytest.approx(0.001)
    assert all(g["momentum"] == 0.8 and g["weight_decay"] == 1e-3 for g in groups.values())
    assert {id(p) for p in groups["head"]["params"]} == {id(model.fc.weight), id(model.fc.bias)}
    assert len(groups["backbone"]["params"]) == len(list(model.parameters())) - 2

    adamw = build_optimizer(param_groups(model, layer, 1e-3, 1.0, 0.5), "adamw", 1e-3, weight_decay=0.05)
    assert isinstance(adamw, torch.optim.AdamW) and [g["lr"] for g in adamw.param_groups] == [1e-3, 5e-4]
    assert adamw.param_groups[0]["weight_decay"] == 0.05


def test_schedules_and_warmup() -> None:
    f = lambda step, **kw: lr_factor(step, total_steps=100, steps_per_epoch=10, **kw)  # noqa: E731
    assert [f(s, warmup_steps=4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert f(10, schedule="cosine", warmup_steps=10) == 1.0 and f(55, schedule="cosine", warmup_steps=10) == pytest.approx(0.5)
    assert f(99, schedule="cosine") < 1e-3 and f(0, schedule="cosine") == 1.0
    assert [f(s, schedule="step", step_epochs=3, gamma=0.1) for s in (0, 29, 30, 60)] == pytest.approx([1, 1, 0.1, 0.01])

    config = small(optimizer="sgd", lr=0.1, head_lr_mult=10, backbone_lr_mult=1, schedule="cosine", warmup_epochs=1, epochs=3)
    layer = nn.Linear(2, 2)
    model = nn.Sequential(nn.Linear(2, 2), layer)
    opt = build_optimizer(param_groups(model, "1", config.lr, 10, 1), "sgd", config.lr)
    sched = build_scheduler(opt, config, steps_per_epoch=4)  # 4 warm-up steps of 12
    lrs = []
    for _ in range(12):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx([0.25, 0.025]) and lrs[3] == pytest.approx([1.0, 0.1])
    assert all(h == pytest.approx(10 * b) for h, b in lrs) and lrs[4][0] > lrs[8][0] > lrs[11][0] > 0


def test_bad_settings_are_refused() -> None:
    for kwargs, message in (
        (dict(recipe="nope"), r"unknown recipe 'nope'; expected one of jdw-finetune, ants-bees"),
        (dict(optimizer="adam"), r"optimizer must be one of sgd, adamw, got 'adam'"),
        (dict(freeze="half"), r"freeze must be none, backbone or a number of stages, got 'half'"),
        (dict(epochs=0), r"epochs must be at least 1, got 0"),
        (dict(warmup_epochs=2, epochs=2), r"warmup_epochs \(2\) must be shorter than epochs \(2\)"),
        (dict(name="../x"), r"name must be a plain folder name"),
    ):
        with pytest.raises(ValueError, match=message):
            FinetuneConfig(**kwargs)


def test_stratified_subset() -> None:
    y = np.array([0] * 10 + [1] * 3 + [2] * 7)
    pick = stratified_subset(y, 4, seed=0)
    assert np.bincount(y[pick]).tolist() == [4, 3, 4] and (np.diff(pick) > 0).all()
    assert np.array_equal(pick, stratified_subset(y, 4, seed=0)) and not np.array_equal(pick, stratified_subset(y, 4, seed=1))


# ---------------------------------------------------------------- recipes


def test_recipes_name_their_source_and_explicit_values_win() -> None:
    assert set(RECIPES) == {"jdw-finetune", "ants-bees", "dog-breed", "d2l-hotdog", "cifar100-resnet18"}
    for i, (name, recipe) in enumerate(RECIPES.items()):
        assert recipe.source.startswith(f"seed 00{i}: ") and recipe.description
        config = FinetuneConfig(recipe=name)
        assert {k: getattr(config, k) for k in recipe.settings} == recipe.settings and config.name == name
    d2l = FinetuneConfig(recipe="d2l-hotdog", lr=0.1, name="mine")
    assert (d2l.lr, d2l.head_lr_mult, d2l.momentum, d2l.weight_decay, d2l.head_init, d2l.name) == (0.1, 10.0, 0.0, 1e-3, "xavier", "mine")
    assert FinetuneConfig(recipe="dog-breed").freeze == "backbone" and FinetuneConfig(recipe="dog-breed", freeze=2).freeze == "2"
    assert FinetuneConfig().name == "finetune"
    # The plain default is AdamW at 1e-4 (measured on two datasets, recipes.py); an optimizer named alone takes its own lr.
    assert (FinetuneConfig().optimizer, FinetuneConfig().lr, FinetuneConfig(optimizer="sgd").lr) == ("adamw", 1e-4, 1e-3)
    assert FinetuneConfig(recipe="ants-bees", optimizer="adamw").lr == 1e-3  # a recipe's lr stays the recipe's



def test_lp_ft_takes_its_own_optimizer_and_learning_rates_over_the_recipes_unless_given() -> None:
    lpft = FinetuneConfig(recipe="jdw-finetune", init_head="linear")
    assert (lpft.optimizer, lpft.lr, lpft.head_lr_mult, lpft.momentum) == ("adamw", 1e-5, 1.0, 0.9)
    mine = FinetuneConfig(recipe="jdw-finetune", init_head="linear", optimizer="sgd", lr=3e-4)
    assert (mine.optimizer, mine.lr, mine.head_lr_mult) == ("sgd", 3e-4, 1.0)
    sgd = FinetuneConfig(recipe="jdw-finetune", init_head="linear", optimizer="sgd")  # AdamW's 1e-5 is not SGD's lr
    assert (sgd.optimizer, sgd.lr, sgd.head_lr_mult) == ("sgd", 1e-4, 1.0)
    plain = FinetuneConfig(recipe="jdw-finetune")
    assert (plain.optimizer, plain.lr, plain.head_lr_mult) == ("sgd", 1e-4, 10.0)

# ---------------------------------------------------------------- a run: loss, files, evaluate and predict


def test_loss_falls_and_the_model_file_serves_evaluate_and_predict(image_folder: Path) -> None:
    other = make_image_folder(Path("other"), {"test": 2}, seed=3)
    lines: list[str] = []
    result = finetune(small(image_folder, epochs=3, targets=("test", str(other))), progress=False, log=lines.append)
    assert result.status == "trained" and result.run_dir == RUN / "finetune" and result.path == RUN / "finetune/model.json"
    assert sorted(p.name for p in result.run_dir.iterdir()) == ["history.csv", "last.pt", "model.json", "model.pt"]
    with open(result.run_dir / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["epoch", "lr_head", "lr_backbone", "train_loss", "train_acc", "val_loss", "val_acc",
                             "test_loss", "test_acc", "other-test_loss", "other-test_acc", "seconds"]
    losses = [float(r["train_loss"]) for r in rows]
    assert losses[-1] < 0.5 * losses[0], losses  # tinted classes: the loss falls
    assert float(rows[-1]["train_acc"]) > 0.8 and result.val_accuracy == max(float(r["val_acc"]) for r in rows)
    # The history starts with the model as initialised (epoch 0), so row i is epoch i.
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2, 3] and rows[0]["lr_head"] == ""
    assert result.best_epoch == [float(r["val_acc"]) for r in rows].index(result.val_accuracy)
    assert len(lines) == 4 and lines[0].startswith("epoch 0/3 (as initialised)  train loss ")
    assert lines[1].startswith("epoch 1/3  train loss ") and " other-test loss " in lines[1] and lines[1].endswith((" s", "*best"))

    state = torch.load(result.run_dir / "model.pt", weights_only=True)
    assert state["format"] == "pipeline-finetuned" and state["classes"] == list(CLASSES) and state["epoch"] == result.best_epoch
    assert state["state_dict"]["fc.weight"].shape == (3, 512)
    meta = json.loads(result.path.read_text())
    assert meta["format"] == "pipeline-finetuned" and meta["model"] == "resnet18" and meta["classifier"] == "fc"
    assert meta["config"]["targets"] == ["test", str(other)] and meta["best_epoch"] == result.best_epoch
    # The model file is also a weights file: extract can run the fine-tuned backbone.
    assert load_backbone("resnet18", str(result.run_dir / "model.pt")).model.fc.out_features == 3

    metrics = evaluate(result.path)
    assert metrics["clf"] == "finetune" and metrics["n"] == 9 and metrics["top1"] == pytest.approx(float(rows[result.best_epoch]["test_acc"]))
    assert Path(metrics["json"]) == result.run_dir / "model-test.json" and Path(metrics["confusion_png"]).read_bytes()[:4] == b"\x89PNG"

    preds, classes = predict(result.path, [image_folder / "test"])
    assert classes == list(CLASSES) and len(preds) == 9
    assert all(sum(r["probabilities"].values()) == pytest.approx(1, abs=1e-5) for r in preds)
    assert np.mean([Path(r["path"]).parent.name == r["label"] for r in preds]) == pytest.approx(metrics["top1"])
    # The loaded model is the best epoch's: its logits on one image are what predict turned into probabilities.
    fm = load_finetuned(result.path)
    x = fm.preprocess.transform()(load_rgb(preds[0]["path"]))[None]
    with torch.no_grad():
        p = torch.softmax(fm.model(x), 1)[0]
    assert p.tolist() == pytest.approx([preds[0]["probabilities"][c] for c in CLASSES], abs=1e-5)

    with pytest.raises(ValueError, match="is a fine-tuned model: it is evaluated on the test images, not on a feature cache"):
        evaluate(result.path, test_cache="test.h5")
    with pytest.raises(ValueError, match="carries its own weights; drop --weights"):
        predict(result.path, [image_folder / "test"], weights="w.pth")
    (result.run_dir / "model.pt").write_bytes((result.run_dir / "model.pt").read_bytes() + b"x")
    with pytest.raises(TamperedArtifactError, match="refusing to load it"):
        evaluate(result.path)


def test_a_target_with_other_classes_is_refused(image_folder: Path) -> None:
    other = make_image_folder(Path("other"), {"test": 1})
    (other / "test" / "dog").mkdir()
    (other / "test" / "ant").rename(other / "test" / "dog" / "x")
    with pytest.raises(ValueError, match=r"other-test: other has classes \['bee', 'cat', 'dog'\], the train split has \['ant', 'bee', 'cat'\]"):
        finetune(small(image_folder, targets=(str(other),)), progress=False)
    with pytest.raises(ValueError, match=r"--target val: val is already a phase of every epoch"):
        finetune(small(image_folder, targets=("val",)), progress=False)


# ---------------------------------------------------------------- resume and re-runs


def _interrupt_after(monkeypatch: pytest.MonkeyPatch, calls: int) -> dict:
    """Make image decoding raise KeyboardInterrupt at its ``calls``-th call, like Ctrl-C at that moment; counts calls."""
    count = {"n": 0}
    original = pipeline.data.load_rgb

    def wrapped(path: object) -> object:
        count["n"] += 1
        if count["n"] == calls:
            raise KeyboardInterrupt
        return original(path)

    monkeypatch.setattr(pipeline.data, "load_rgb", wrapped)
    return count


def test_resume_after_interruption_equals_an_uninterrupted_run(image_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Dropout and augmentation draw random numbers (mobilenet_v2 has dropout, crop-flip augments), SGD keeps momentum,
    # and cosine decays per step: all of it must continue exactly.
    settings = dict(model="mobilenet_v2", optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=1e-4, schedule="cosine", epochs=3)
    whole = finetune(small(image_folder, name="whole", **settings), progress=False)

    per_epoch = 27 + 3  # every one of the 27 train images (the last partial batch is kept), and 3 val images
    with monkeypatch.context() as m:
        _interrupt_after(m, 2 * per_epoch + 10)  # epoch 0 (the model as initialised) reads as many; then in epoch 2's training
        with pytest.raises(KeyboardInterrupt):
            finetune(small(image_folder, name="cut", **settings), progress=False)
    cut = RUN.with_name("mobilenet_v2-none") / "cut"
    assert not (cut / "model.json").exists() and torch.load(cut / "last.pt", weights_only=True)["epoch"] == 1

    count = _interrupt_after(monkeypatch, -1)
    resumed = finetune(small(image_folder, name="cut", **settings), progress=False)
    assert resumed.status == "resumed" and count["n"] == 2 * per_epoch  # epochs 2 and 3 only
    a = torch.load(whole.run_dir / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(resumed.run_dir / "model.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    last_a, last_b = (torch.load(r.run_dir / "last.pt", weights_only=True)["model"] for r in (whole, resumed))
    assert all(torch.equal(last_a[k], last_b[k]) for k in last_a)
    strip = lambda h: [{k: v for k, v in row.items() if k != "seconds"} for row in h]  # noqa: E731
    assert strip(whole.history) == strip(resumed.history) and len(resumed.history) == 4
    assert (resumed.best_epoch, resumed.val_accuracy) == (whole.best_epoch, whole.val_accuracy)


def test_rerun_is_a_no_op_and_other_settings_are_refused_unless_forced(image_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = small(image_folder, epochs=1)
    first = finetune(config, progress=False)
    again = finetune(replace(config, workers=0, log_every=5), progress=False)  # speed and logging are not settings
    assert again.status == "up-to-date" and again.best_epoch == first.best_epoch
    with pytest.raises(ValueError, match=r"runs/ds/resnet18-none/finetune holds a run with other settings \(lr: 0.001 -> 0.002\); pass --force"):
        finetune(replace(config, lr=2e-3), progress=False)
    assert finetune(replace(config, lr=2e-3), force=True, progress=False).status == "trained"
    assert finetune(replace(config, lr=2e-3), force=True, progress=False).status == "up-to-date"  # what make all relies on

    with monkeypatch.context() as m:
        _interrupt_after(m, 63)  # 30 images for epoch 0, 30 for epoch 1, then in epoch 2
        with pytest.raises(KeyboardInterrupt):
            finetune(small(image_folder, epochs=2, name="other"), progress=False)
    with pytest.raises(ValueError, match=r"an interrupted fine-tune in runs/ds/resnet18-none/other used other settings \(epochs: 2 -> 3\)"):
        finetune(small(image_folder, epochs=3, name="other"), progress=False)


def test_unreadable_images_are_all_named_before_training_and_an_up_to_date_run_decodes_nothing(
        image_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    train = sorted((image_folder / "train").rglob("*.png"))
    for bad in train[:2]:
        bad.write_bytes(bad.read_bytes()[:40])  # the header survives, the pixels do not
    with pytest.raises(ValueError, match=re.escape(str(train[0])) + ".*" + re.escape(str(train[1]))):
        finetune(small(image_folder, epochs=1), progress=False)
    for bad in train[:2]:
        bad.unlink()
    finetune(small(image_folder, epochs=1), progress=False)
    verified: list[int] = []
    real = pipeline.data.verify_images
    monkeypatch.setattr(pipeline.data, "verify_images", lambda paths: verified.append(len(paths)) or real(paths))
    assert finetune(small(image_folder, epochs=1), progress=False).status == "up-to-date"
    assert verified == []


@pytest.mark.parametrize("damage", [pytest.param("garbage", marks=pytest.mark.slow), "truncated"])
def test_a_damaged_checkpoint_is_named_and_force_starts_over(image_folder: Path, monkeypatch: pytest.MonkeyPatch, damage: str) -> None:
    config = small(image_folder, epochs=2)
    with monkeypatch.context() as m:
        _interrupt_after(m, 2 * 30 + 10)  # 27 train and 3 val images an epoch, epoch 0 too: in epoch 2's training, after last.pt of epoch 1
        with pytest.raises(KeyboardInterrupt):
            finetune(config, progress=False)
    last = RUN / "finetune/last.pt"
    assert torch.load(last, weights_only=True)["epoch"] == 1
    last.write_bytes(b"not a checkpoint" if damage == "garbage" else last.read_bytes()[:200])

    with pytest.raises(ValueError, match=r"^runs/ds/resnet18-none/finetune/last.pt is damaged \(.*\); pass --force to start the run over") as e:
        finetune(config, progress=False)
    assert "\n" not in str(e.value)
    started_over = finetune(config, force=True, progress=False)
    assert started_over.status == "trained" and [r["epoch"] for r in started_over.history] == [0, 1, 2]
    meta = load_finetuned(started_over.path).meta
    assert meta["settings"]["epochs"] == 2 and meta["inputs"] == meta["settings"] and "torch" in meta["versions"]
    assert finetune(config, progress=False).status == "up-to-date"
    if damage == "garbage":  # the finished run's metadata, likewise
        started_over.path.write_text("{")
        with pytest.raises(ValueError, match=r"^runs/ds/resnet18-none/finetune/model.json is unreadable; pass --force to start the run over"):
            finetune(config, progress=False)
        assert finetune(config, force=True, progress=False).status == "trained"


# ---------------------------------------------------------------- LP-FT


@pytest.fixture(scope="module")
def heads(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Tiny extractions (train, val, test) of two backbones, each with a linear head; a logreg head with PCA; a head on another tap."""
    root = tmp_path_factory.mktemp("lpft")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as m:
        m.setenv("PIPELINE_OFFLINE", "1")
        m.chdir(root)
        data = make_image_folder(root / "ds", {"train": 10, "test": 3})
        out = SimpleNamespace(root=root, data=data, linear={}, test={})
        for model in ("mobilenet_v2", "resnet18"):
            source = ExtractConfig(data=str(data), cache_dir=str(root / "features"), **tiny(model=model))
            caches = {s: extract(replace(source, split=s), progress=False).path for s in ("train", "val", "test")}
            out.linear[model] = fit_head(HeadConfig(clf="linear", grid=(1e-3,), refine=0, epochs=10), source, out=root / model / "linear").path
            out.test[model] = caches["test"]
            if model == "mobilenet_v2":
                out.logreg = fit_head(HeadConfig(clf="logreg", grid=(1.0,), refine=0), source, out=root / model / "logreg").path
                spatial = replace(source, layers=("features.18",))
                for s in ("train", "val"):
                    extract(replace(spatial, split=s), progress=False)
                out.spatial = fit_head(HeadConfig(clf="linear", grid=(1e-3,), refine=0, epochs=2), spatial, out=root / model / "spatial").path
    torch.set_num_threads(n)
    return out


@pytest.mark.parametrize("model", ["mobilenet_v2", "resnet18"])  # tap classifier:input; tap avgpool:output
def test_lp_ft_starts_from_the_linear_heads_predictions(heads: SimpleNamespace, model: str) -> None:
    config = FinetuneConfig(data=str(heads.data), model=model, weights="none", crop=32, resize=36, init_head=str(heads.linear[model]))
    net, backbone, _ = build_model(config, CLASSES)
    art = load_head(heads.linear[model])
    assert [name for name, _ in art.pipeline.steps] == ["pool", "standardize", "clf"]
    with read_cache(heads.test[model]) as cache:
        features = cache.features()
        x = torch.stack([backbone.preprocess.transform()(load_rgb(heads.data / p)) for p in cache.paths])
    expected = art.pipeline.decision_function(features)
    with torch.no_grad():
        got = net.eval()(x).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    assert (got.argmax(1) == art.pipeline.predict(features)).all()
    # Without the head, the classifier starts elsewhere: the check above can fail.
    plain, _, _ = build_model(replace(config, init_head=None), CLASSES)
    with torch.no_grad():
        assert not np.allclose(plain.eval()(x).numpy(), expected, atol=1e-2)



def test_lp_ft_that_moves_no_weight_keeps_the_probes_accuracy_with_frozen_norm_layers(heads: SimpleNamespace, tmp_path: Path) -> None:
    """In the default norm mode an epoch whose steps move no weight (lr x 0 for both groups) leaves epoch 1 exactly
    where epoch 0 was; re-estimated batch statistics (the control) move it although no weight moves. A random-weight
    network this small is chaotic enough that steps of 1e-12 already move its loss, hence zero steps."""
    runs = {}
    for norm in ("frozen", "train"):
        config = FinetuneConfig(data=str(heads.data), model="mobilenet_v2", weights="none", crop=32, resize=36, workers=0,
                                device="cpu", init_head=str(heads.linear["mobilenet_v2"]), head_lr_mult=0.0, backbone_lr_mult=0.0, epochs=1, batch_size=4,
                                augment="none", norm=norm, output_dir=str(tmp_path / norm))
        assert config.norm == norm and (norm == "train" or FinetuneConfig(data=str(heads.data)).norm == "frozen")
        result = finetune(config, progress=False)
        with open(result.run_dir / "history.csv", newline="") as f:
            runs[norm] = [(float(r["val_loss"]), float(r["val_acc"])) for r in csv.DictReader(f)]
    (loss0, acc0), (loss1, acc1) = runs["frozen"]
    assert acc1 == acc0 and loss1 == loss0
    assert runs["train"][0] == runs["frozen"][0] and abs(runs["train"][1][0] - loss0) > 1e-3

def test_lp_ft_refuses_heads_it_cannot_start_from(heads: SimpleNamespace) -> None:
    base = dict(data=str(heads.data), model="mobilenet_v2", weights="none", crop=32, resize=36)
    with pytest.raises(ValueError, match=r"was fitted on features of another backbone \(preprocess: head \{.*'crop': 32.*\}, fine-tune \{.*'crop': 40"):
        build_model(FinetuneConfig(**{**base, "crop": 40, "resize": 45}, init_head=str(heads.linear["mobilenet_v2"])), CLASSES)
    with pytest.raises(ValueError, match=r"model: head 'resnet18', fine-tune 'mobilenet_v2'"):
        build_model(FinetuneConfig(**base, init_head=str(heads.linear["resnet18"])), CLASSES)
    with pytest.raises(ValueError, match=r"has a pca step \(_CappedPCA\); only a linear head on the features"):
        build_model(FinetuneConfig(**base, init_head=str(heads.logreg)), CLASSES)
    with pytest.raises(ValueError, match=r"was fitted on the tap features.18:output; initialising classifier.1 needs features of its input \(classifier.1:input or classifier:input\)"):
        build_model(FinetuneConfig(**base, init_head=str(heads.spatial)), CLASSES)


# ---------------------------------------------------------------- the command line


TINY = ["--model", "resnet18", "--weights", "none", "--crop", "32", "--resize", "36", "--batch-size", "8", "--workers", "0",
        "--device", "cpu", "--optimizer", "adamw", "--lr", "0.001", "--no-progress"]


def _run(*args: object) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


def _ok(result: Result) -> str:
    assert result.exit_code == 0 and result.exception is None, result.output
    return result.output


def _error(result: Result) -> str:
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in result.output, result.output
    return lines[0][len("Error: "):]


def test_finetune_evaluate_and_predict_commands(image_folder: Path) -> None:
    out = _ok(_run("finetune", "--data", image_folder, *TINY, "--epochs", "2", "--target", "test", "--log-every", "1"))
    lines = out.splitlines()
    assert [line.split()[:2] for line in lines if line.startswith("epoch")] == [["epoch", "0/2"], ["epoch", "1/2"], ["epoch", "2/2"]]
    assert sum(line.startswith("  epoch 1 batch ") for line in lines) == 4  # 27 images in batches of 8, the last one kept
    assert lines[-1].startswith("finetune: best epoch ") and lines[-1].endswith("-> runs/ds/resnet18-none/finetune/model.json")
    again = _ok(_run("finetune", "--data", image_folder, *TINY, "--epochs", "2", "--target", "test"))
    assert again.startswith("runs/ds/resnet18-none/finetune/model.json is up to date (best epoch ") and again.strip().endswith("; nothing to do")

    model = RUN / "finetune/model.json"
    assert re.search(r"(^|img/s\]|\n)finetune: test top-1 [01]\.\d{4} \(95 % CI [01]\.\d{4}-[01]\.\d{4}\), balanced accuracy [01]\.\d{4}, ECE ", _ok(_run("evaluate", model)))  # after the progress bar
    assert _ok(_run("predict", image_folder / "test", "--head", model, "-o", "p.csv")).strip().splitlines()[-1] == "9 images predicted, 0 skipped -> p.csv"
    with open("p.csv", newline="") as f:
        assert list(next(csv.reader(f))) == ["path", "label", "score", "error", "p_ant", "p_bee", "p_cat"]

    assert _error(_run("finetune", "--data", image_folder, *TINY, "--freeze", "9")).startswith("cannot freeze 9 stages: ResNet has 5 (conv1+bn1,")
    assert _error(_run("finetune", "--data", image_folder, *TINY, "--init-head", "nope.json")) == "no head metadata at nope.json; fit a head with pipeline fit-head first"
    assert _error(_run("evaluate", model, "--test-cache", "t.h5")).endswith("is a fine-tuned model: it is evaluated on the test images, not on a feature cache; drop --test-cache")
    assert "Invalid value for '--recipe'" in _run("finetune", "--recipe", "nope").output


def test_recipe_and_pipeline_toml_reach_the_optimizer(image_folder: Path) -> None:
    """[extract]'s dataset and backbone, [finetune]'s settings, a recipe under them and options over all."""
    Path("pipeline.toml").write_text(f'[extract]\ndata = "{image_folder}"\nweights = "none"\ncrop = 32\nresize = 36\nsplit = "test"\n'
                                     '[finetune]\nepochs = 1\nbatch_size = 8\nworkers = 0\ndevice = "cpu"\n')
    out = _ok(_run("finetune", "--recipe", "d2l-hotdog", "--no-progress", "--lr", "0.001"))
    assert out.splitlines()[-1].endswith("-> runs/ds/resnet18-none/d2l-hotdog/model.json")
    meta = json.loads(Path("runs/ds/resnet18-none/d2l-hotdog/model.json").read_text())
    assert meta["recipe_source"].startswith("seed 003: d2l.ai")
    config = meta["config"]
    assert (config["model"], config["optimizer"], config["momentum"], config["weight_decay"], config["head_init"], config["epochs"]) == ("resnet18", "sgd", 0.0, 1e-3, "xavier", 1)
    assert meta["history"][1]["lr_head"] == pytest.approx(0.01) and meta["history"][1]["lr_backbone"] == pytest.approx(0.001)


def test_lp_ft_from_a_probe_of_flip_averaged_features_says_what_its_epoch_0_is(heads: SimpleNamespace, tmp_path: Path) -> None:
    linear = Path(heads.linear["mobilenet_v2"])
    meta = json.loads(linear.read_text())
    flipped = linear.with_name("flipped.json")  # the same head, as if fitted on a cache of extract --flip
    flipped.write_text(json.dumps({**meta, "features": {**meta["features"], "flip": True}}))
    got = {}
    for name, head in (("plain", linear), ("flipped", flipped)):
        config = FinetuneConfig(data=str(heads.data), model="mobilenet_v2", weights="none", crop=32, resize=36, workers=0, device="cpu",
                                init_head=str(head), epochs=1, batch_size=8, augment="none", output_dir=str(tmp_path / name))
        result = finetune(config, progress=False)
        got[name] = (result.warnings, json.loads(result.path.read_text())["warnings"])
    assert got["plain"] == ([], [])
    (line,), recorded = got["flipped"]
    assert recorded == [line] and line.startswith("LP-FT starts from a probe fitted on features averaged with the mirror images'")
