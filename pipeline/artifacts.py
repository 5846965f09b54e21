"""Model files: saving fitted heads with their metadata, and loading heads and fine-tuned models safely.

Torch heads are plain tensors and strings, loaded with ``torch.load(weights_only=True)``. scikit-learn heads are
joblib pickles; a pickle runs code when loaded, so its sha256 is recorded in a JSON sidecar when it is written
and checked before it is unpickled: a tampered or foreign file is refused, not executed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import torch
from torch import nn
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import Normalizer, StandardScaler

from .backbones import Preprocess, file_sha256, replace_classifier
from .files import atomic_write
from .heads import SpatialPool, TorchLinearHead
from .layout import FINETUNED_FORMAT, HEAD_FORMAT, head_files

__all__ = ["save_head", "load_head", "HeadArtifact", "TamperedArtifactError", "FinetunedModel", "is_finetuned", "load_finetuned",
           "read_meta", "verified_artifact", "feature_identity"]


class TamperedArtifactError(ValueError):
    """An artifact whose bytes differ from the digest recorded when it was written."""


class HeadArtifact:
    """A loaded head: the fitted scikit-learn Pipeline and its metadata."""

    def __init__(self, pipeline: Pipeline, meta: dict, path: Path) -> None:
        self.pipeline = pipeline
        self.meta = meta
        self.path = path

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    def check_features(self, cache_attrs: dict) -> None:
        """Refuse features from another backbone, weights, tap or preprocessing than the head was fitted on."""
        mine = self.meta["features"]
        theirs = feature_identity(cache_attrs)
        diff = [f"{k}: head {mine.get(k)!r}, features {theirs.get(k)!r}" for k in sorted(mine) if mine.get(k) != theirs.get(k)]
        if diff:
            raise ValueError(f"{self.path} was fitted on other features ({'; '.join(diff)})")


def feature_identity(attrs: dict) -> dict:
    """What makes two caches' features comparable: backbone, weights, tap, preprocessing, dtype-independent."""
    settings = attrs.get("settings", attrs)
    return {k: settings.get(k) for k in ("model", "weights", "weights_sha256", "taps", "preprocess", "amp")}



def _torch_state(pipe: Pipeline) -> dict[str, Any] | None:
    """The tensors of pool/standardize/l2 + TorchLinearHead pipelines; None for other pipelines."""
    state: dict[str, Any] = {"steps": []}
    for name, step in pipe.steps:
        if isinstance(step, SpatialPool):
            state["steps"].append(f"pool:{step.mode}")
            state["pool_shape"] = list(step.input_shape_)
        elif isinstance(step, StandardScaler):
            state["steps"].append("standardize")
            state["mean"], state["scale"] = torch.from_numpy(step.mean_.copy()), torch.from_numpy(step.scale_.copy())
        elif isinstance(step, Normalizer):
            state["steps"].append("l2")
        elif isinstance(step, TorchLinearHead):
            state["steps"].append("linear")
            state["weight"], state["bias"] = torch.from_numpy(step.coef_.copy()), torch.from_numpy(step.intercept_.copy())
            state["classes"] = step.classes_.tolist()
            state["params"] = json.dumps(step.get_params())
            state["history"] = json.dumps(step.history_)
            state["best_epoch"] = int(step.best_epoch_)
        else:
            return None
    return state


def _pipeline_from_torch(state: dict[str, Any]) -> Pipeline:
    steps = []
    for s in state["steps"]:
        if s.startswith("pool:"):
            pool = SpatialPool(s.split(":", 1)[1])
            pool.input_shape_ = tuple(state["pool_shape"])
            pool.n_features_in_ = int(np.prod(pool.input_shape_))
            steps.append(("pool", pool))
        elif s == "standardize":
            sc = StandardScaler()
            sc.mean_, sc.scale_ = state["mean"].numpy(), state["scale"].numpy()
            sc.var_ = sc.scale_**2
            sc.n_features_in_ = len(sc.mean_)
            sc.n_samples_seen_ = 0
            steps.append(("standardize", sc))
        elif s == "l2":
            steps.append(("l2", Normalizer().fit(np.zeros((1, state["weight"].shape[1])))))
        elif s == "linear":
            head = TorchLinearHead(**json.loads(state["params"]))
            head.coef_, head.intercept_ = state["weight"].numpy(), state["bias"].numpy()
            head.classes_ = np.asarray(state["classes"])
            head.n_features_in_ = head.coef_.shape[1]
            head.history_ = json.loads(state["history"])
            head.best_epoch_ = state["best_epoch"]
            steps.append(("clf", head))
    return Pipeline(steps)


def read_meta(path: str | os.PathLike, fmt: str, what: str, kind: str, hint: str) -> tuple[Path, dict]:
    """The metadata JSON of an artifact (``path`` is it or its artifact), checked to be of format ``fmt``.

    Args:
        fmt: the expected ``format`` value.
        what: how messages name the metadata's owner, e.g. ``head``.
        kind: what the file claims to be, e.g. ``pipeline head``.
        hint: what to do when the file is missing.

    Raises:
        ValueError: a missing, unreadable or foreign metadata file.
    """
    meta_path = Path(path).with_suffix(".json")
    if not meta_path.is_file():
        raise ValueError(f"no {what} metadata at {meta_path}; {hint}")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{meta_path} is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != fmt or "artifact" not in meta or "artifact_sha256" not in meta:
        raise ValueError(f"{meta_path} is not a {kind}")
    return meta_path, meta


def artifact_path(meta_path: Path, meta: dict) -> Path:
    """The artifact a metadata file names, which must be a plain file name beside it.

    Raises:
        ValueError: a name with a directory part, or no such file.
    """
    name = str(meta["artifact"])
    if Path(name).name != name or name in ("", ".", ".."):
        raise ValueError(f"{meta_path} names an artifact {name!r} that is not beside it")
    artifact = meta_path.with_name(name)
    if not artifact.is_file():
        raise ValueError(f"{meta_path} names an artifact {name!r} that is not beside it")
    return artifact


def verified_artifact(meta_path: Path, meta: dict) -> Path:
    """:func:`artifact_path`, after checking that its bytes still have the sha256 recorded when it was written.

    Raises:
        TamperedArtifactError: the digests differ.
    """
    artifact = artifact_path(meta_path, meta)
    digest = file_sha256(artifact)
    if digest != meta["artifact_sha256"]:
        raise TamperedArtifactError(
            f"{artifact} does not match the sha256 recorded when it was written "
            f"({meta['artifact_sha256'][:16]}... expected, {digest[:16]}... found); refusing to load it"
        )
    return artifact


def save_head(pipe: Pipeline, meta: dict, path: str | os.PathLike) -> Path:
    """Write a fitted head and its metadata, atomically.

    Torch heads go to ``<path>.pt`` (tensors, loadable with ``weights_only=True``); others to ``<path>.joblib``.
    Either way ``<path>.json`` holds the metadata and the artifact's sha256.

    Returns:
        The path of the JSON metadata file, which names the artifact.
    """
    files = head_files(path)
    files.base.parent.mkdir(parents=True, exist_ok=True)
    state = _torch_state(pipe)
    if state is not None:
        artifact = files.torch
        atomic_write(artifact, lambda f: torch.save(state, f))
    else:
        artifact = files.sklearn
        atomic_write(artifact, lambda f: joblib.dump(pipe, f))
    record = {**meta, "artifact": artifact.name, "artifact_sha256": file_sha256(artifact), "format": HEAD_FORMAT, "format_version": 1}
    meta_path = files.meta
    atomic_write(meta_path, lambda f: f.write(json.dumps(record, indent=1, sort_keys=True, default=str).encode()))
    return meta_path


def load_head(path: str | os.PathLike) -> HeadArtifact:
    """Load a head from its ``.json`` (or its ``.pt``/``.joblib``), checking the recorded sha256 first.

    Raises:
        ValueError: a missing or malformed metadata file.
        TamperedArtifactError: the artifact's bytes differ from the recorded digest.
    """
    meta_path, meta = read_meta(path, HEAD_FORMAT, "head", "pipeline head", "fit a head with pipeline fit-head first")
    artifact = verified_artifact(meta_path, meta)
    if artifact.suffix == ".pt":
        pipe = _pipeline_from_torch(torch.load(artifact, map_location="cpu", weights_only=True))
    else:
        pipe = joblib.load(artifact)
    return HeadArtifact(pipe, meta, meta_path)


# ---------------------------------------------------------------- fine-tuned models


@dataclass
class FinetunedModel:
    """A loaded fine-tuned model: the module (eval mode, CPU), its classes and eval preprocessing, and its metadata."""

    model: nn.Module
    classes: list[str]
    preprocess: Preprocess
    meta: dict
    path: Path


def is_finetuned(path: str | os.PathLike) -> bool:
    """Whether ``path`` (a ``.json`` or its ``.pt``) is a fine-tuned model's metadata rather than a head's."""
    meta_path = Path(path).with_suffix(".json")
    if not meta_path.is_file():
        return False
    try:
        return json.loads(meta_path.read_text()).get("format") == FINETUNED_FORMAT
    except (json.JSONDecodeError, AttributeError):
        return False


def load_finetuned(path: str | os.PathLike) -> FinetunedModel:
    """Load a fine-tuned model from its ``model.json`` (or ``model.pt``), checking the recorded sha256 first.

    The weights are read with ``torch.load(weights_only=True)``.

    Raises:
        ValueError: a missing or malformed file, or weights that do not fit the model.
        TamperedArtifactError: the model file differs from the digest recorded when it was written.
    """
    meta_path, meta = read_meta(path, FINETUNED_FORMAT, "fine-tuned model", "fine-tuned model", "run pipeline finetune first")
    artifact = verified_artifact(meta_path, meta)
    state = torch.load(artifact, map_location="cpu", weights_only=True)
    import torchvision

    with torch.random.fork_rng(devices=[]):
        model = torchvision.models.get_model(meta["model"], weights=None)
        replace_classifier(model, len(meta["classes"]))
    missing, unexpected = model.load_state_dict(state["state_dict"], strict=False)
    # Inception/GoogLeNet made with pretrained weights drop their auxiliary classifiers; so must the rebuilt one.
    absent = {k.split(".")[0] for k in missing}
    if unexpected or not absent <= {"aux1", "aux2", "AuxLogits"}:
        raise ValueError(f"{artifact} does not fit {meta['model']}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    for name in absent:
        setattr(model, name, None)
        model.aux_logits = False
    model.eval()
    p = meta["preprocess"]
    pre = Preprocess(resize=p["resize"], crop=p["crop"], mean=tuple(p["mean"]), std=tuple(p["std"]),
                     interpolation=p.get("interpolation", "bilinear"), antialias=p.get("antialias", True))
    return FinetunedModel(model, list(meta["classes"]), pre, meta, meta_path)
