"""Prediction: backbone, tap and head (or a fine-tuned model, or an exported ONNX model) end to end on new images.

torch and scikit-learn are imported inside the functions that use them: writing predictions, and predicting with
an exported model (:mod:`pipeline.onnx_model`), need neither.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from .images import find_images, scan_inputs

if TYPE_CHECKING:
    from .artifacts import FinetunedModel, HeadArtifact
    from .backbones import Backbone
    from .taps import TapExtractor

__all__ = ["predict", "write_predictions", "find_images", "image_logits", "head_backbone", "prediction_rows"]


def predict(
    head: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    *,
    on_error: str = "fail",
    weights: str | None = None,
    batch_size: int = 64,
    device: str = "auto",
    engine: str = "auto",
) -> tuple[list[dict], list[str]]:
    """Predict the class of each image with a fitted head, a fine-tuned model or an exported ONNX model.

    The backbone, weights, tap and preprocessing are those of the cache the head was fitted on. A fine-tuned
    model (``model.json`` of pipeline finetune) carries its own weights and preprocessing, and runs eagerly. An
    exported model (``.onnx``, :func:`pipeline.export.export`) runs on ONNX Runtime alone, without torch.

    Args:
        head: the head's ``.json`` path, a fine-tuned model's ``model.json``, or an exported ``.onnx``.
        inputs: image files and folders.
        on_error: ``fail`` on an unreadable file, or ``skip`` it (its row carries the error).
        weights: the backbone's weights file, needed when the cache was made from a local state_dict.
        batch_size: images per forward pass.
        device: where the backbone runs.
        engine: ``auto``, ``eager`` or ``onnx``.

    Returns:
        (rows, classes): per image its path, label, score and ``probabilities`` (by class, as
        :func:`pipeline.heads.head_probabilities` defines them), or its error.
    """
    from .validate import conform

    batch_size = conform(batch_size, "int", "predict's batch_size")
    if batch_size < 1:
        raise ValueError(f"predict's batch_size must be at least 1, got {batch_size}")
    for name, value in (("device", device), ("engine", engine)):
        conform(value, "str", f"predict's {name}")
    weights = conform(weights, "str | None", "predict's weights")
    if Path(head).suffix.lower() == ".onnx":
        if weights is not None or device not in ("auto", "cpu") or engine not in ("auto", "onnx"):
            raise ValueError(f"{head} is an exported model: it carries its weights and runs on ONNX Runtime on the CPU; drop --weights, --device and --engine")
        from .onnx_model import predict_onnx

        return predict_onnx(head, inputs, on_error=on_error, batch_size=batch_size)
    import torch

    from .artifacts import is_finetuned, load_head
    from .data import ImageDataset, collate_batch
    from .engines import BatchRunner
    from .heads import head_probabilities
    from .runtime import resolve_runtime

    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be fail or skip, got {on_error!r}")
    if is_finetuned(head):
        return _predict_finetuned(head, inputs, on_error=on_error, weights=weights, batch_size=batch_size, device=device, engine=engine)
    art = load_head(head)
    settings = art.meta["extract_settings"]
    backbone, extractor = head_backbone(art, weights)
    found = scan_inputs(inputs)
    found.check(on_error)
    paths = found.paths
    rows: dict[int, dict] = {}
    runtime = resolve_runtime(device, settings.get("amp"))
    loader = torch.utils.data.DataLoader(ImageDataset(Path("."), paths, backbone.preprocess.transform()), batch_size=batch_size, collate_fn=collate_batch)
    with extractor:
        kind = engine if engine != "auto" else settings.get("engine", "auto")
        for index, features, bad in BatchRunner(loader, extractor, kind, runtime, on_error=on_error, name=lambda i: paths[i]):
            for i, why in bad:
                rows[i] = {"path": paths[i], "error": why}
            if features is not None:
                probabilities = head_probabilities(art.pipeline, features[0], art.temperature)
                rows.update(prediction_rows(index, [paths[i] for i in index], probabilities, art.classes))
    return found.rows(rows), art.classes


def head_backbone(art: HeadArtifact, weights: str | None = None) -> tuple[Backbone, TapExtractor]:
    """The backbone and preprocessing of the cache a head was fitted on, and an extractor that gives the head's
    features as its one output: its tap, or its taps joined, flip-averaged if the cache's were.

    Args:
        art: the loaded head.
        weights: the backbone's weights file, needed when the cache was made from a local state_dict.

    Raises:
        ValueError: a weights file missing or not the one the features came from.
    """
    from .artifacts import require_fields
    from .backbones import load_backbone
    from .config import tap_parts
    from .taps import Tap, TapExtractor

    require_fields(art.path, art.meta, ("tap", "extract_settings.model", "extract_settings.weights", "extract_settings.taps",
                                        *(f"extract_settings.preprocess.{k}" for k in ("resize", "crop", "mean", "std"))))
    settings = art.meta["extract_settings"]
    parts = tap_parts(art.meta["tap"])
    if not set(parts) <= set(settings["taps"]):
        raise ValueError(f"{art.path}: the field 'tap' ({art.meta['tap']!r}) is not one of extract_settings.taps {settings['taps']}")
    label = settings["weights"]
    if label.startswith("file:") and weights is None:
        raise ValueError(f"the head's features came from the weights file {label[5:]}; pass it with --weights PATH")
    pre = settings["preprocess"]
    backbone = load_backbone(settings["model"], weights or label, resize=pre["resize"], crop=pre["crop"], mean=tuple(pre["mean"]), std=tuple(pre["std"]))
    if settings.get("weights_sha256") and backbone.weights_sha256 != settings["weights_sha256"]:
        raise ValueError(f"{weights} is not the weights file the head's features came from (sha256 differs)")
    flip = settings.get("flip", False)
    if not isinstance(flip, bool):
        raise ValueError(f"{art.path}: the field 'extract_settings.flip' should be true or false, found {flip!r}")
    return backbone, TapExtractor(backbone.model, [Tap.parse(t) for t in parts], flip=flip, join=len(parts) > 1)


def prediction_rows(positions: Sequence[int], paths: Sequence[str], probabilities: np.ndarray, classes: list[str]) -> dict[int, dict]:
    """Rows of predictions by position: path, label (the most probable class), its probability, and every class's.

    The one place rows are made, for heads, fine-tuned models and exported models alike.
    """
    rows = {}
    for i, path, row in zip(np.asarray(positions).tolist(), paths, np.asarray(probabilities, dtype=np.float64)):
        k = int(np.argmax(row))
        rows[i] = {"path": path, "label": classes[k], "score": float(row[k]), "probabilities": {c: float(v) for c, v in zip(classes, row)}}
    return rows


def _predict_finetuned(path: str | os.PathLike, inputs: Sequence[str | os.PathLike], *, on_error: str, weights: str | None,
                       batch_size: int, device: str, engine: str) -> tuple[list[dict], list[str]]:
    """Class probabilities (softmax of the logits) of a fine-tuned model, in the rows predict returns for heads."""
    if weights is not None:
        raise ValueError(f"{path} is a fine-tuned model and carries its own weights; drop --weights")
    if engine not in ("auto", "eager"):
        raise ValueError(f"{path} is a fine-tuned model, which runs on the eager engine only, not {engine}")
    from .artifacts import load_finetuned
    from .stats import softmax

    fm = load_finetuned(path)
    found = scan_inputs(inputs)
    found.check(on_error)
    paths = found.paths
    positions, logits, bad = image_logits(fm, ".", paths, device=device, batch_size=batch_size, on_error=on_error)
    proba = softmax(logits)
    rows: dict[int, dict] = {i: {"path": paths[i], "error": why} for i, why in bad}
    rows.update(prediction_rows(positions, [paths[i] for i in positions], proba, fm.classes))
    return found.rows(rows), fm.classes


def image_logits(fm: FinetunedModel, root: str | os.PathLike, paths: Sequence[str], *, device: str = "auto", batch_size: int = 64,
                 on_error: str = "skip", engine: str = "auto", progress: bool = False) -> tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]:
    """Class logits of images under ``root`` with a fine-tuned model's eval preprocessing.

    The model runs as extraction does: its classifier layer's output is the tap, and on a plain-fp32 CPU run the
    ``auto`` engine uses ONNX Runtime when its logits match eager torch within ``ONNX_TOLERANCE``.

    Returns:
        (positions of the readable images, their N x classes logits, [(position, reason)] of unreadable ones).

    Raises:
        ValueError: an unreadable image under ``on_error="fail"``.
    """
    import torch
    from tqdm.auto import tqdm

    from .backbones import final_linear
    from .data import ImageDataset, collate_batch
    from .engines import BatchRunner
    from .runtime import resolve_runtime
    from .taps import Tap, TapExtractor

    runtime = resolve_runtime(device, None)
    loader = torch.utils.data.DataLoader(ImageDataset(Path(root), paths, fm.preprocess.transform()), batch_size=batch_size,
                                         collate_fn=collate_batch, pin_memory=runtime.pin_memory)
    layer = fm.meta.get("classifier") or final_linear(fm.model)[0]
    positions, logits, bad_all = [], [], []
    with TapExtractor(fm.model, [Tap(layer, "output")]) as extractor, tqdm(
            total=len(paths), unit="img", desc="predict", disable=not progress, dynamic_ncols=True,
            mininterval=0.5 if sys.stderr.isatty() else 30) as bar:
        for index, features, bad in BatchRunner(loader, extractor, engine, runtime, on_error=on_error, name=lambda i: str(Path(root) / paths[i])):
            bad_all += bad
            if features is not None:
                positions.append(index)
                logits.append(features[0])
            bar.update(len(index) + len(bad))
    k = len(fm.classes)
    return (np.concatenate(positions) if positions else np.zeros(0, np.int64),
            np.concatenate(logits) if logits else np.zeros((0, k), np.float32), bad_all)


def write_predictions(rows: list[dict], classes: list[str], path: str | os.PathLike) -> Path:
    """Write predictions as JSON (``.json``) or CSV (anything else): path, label, score, then one column per class."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps(rows, indent=1))
        return path
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "score", "error", *("p_" + c for c in classes)])
        for r in rows:
            values = r.get("probabilities", {})
            w.writerow([r["path"], r.get("label", ""), f"{r['score']:.6f}" if "score" in r else "", r.get("error", ""),
                        *(f"{values[c]:.6f}" if c in values else "" for c in classes)])
    return path
