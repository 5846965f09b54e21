"""Model files: saving fitted heads with their metadata, and loading heads and fine-tuned models safely.

No pickle is ever loaded. Torch heads are plain tensors and strings, loaded with ``torch.load(weights_only=True)``.
scikit-learn heads are skops files, loaded with an explicit list of the types a head is made of
(:data:`TRUSTED_TYPES`): a file naming any other type is refused before anything in it is built, and what is
built must be a Pipeline of head steps. Either way the artifact's sha256 is recorded in a JSON sidecar when it
is written and checked before it is read, so a tampered or swapped file is refused too: the bytes checked are
the bytes loaded, read once. A head's artifact is named by its digest and its metadata is written last, so that
replacing a head never leaves a mix of the old and the new (:func:`save_head`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from sklearn.pipeline import Pipeline

from .backbones import Preprocess, replace_classifier
from .files import file_sha256
from .files import atomic_write, file_lock, remove_stale_temps
from .head_formats import TRUSTED_TYPES, UntrustedArtifactError, load_skops_head, load_torch_head, torch_load, torch_state
from .validate import brief
from .layout import FINETUNED_FORMAT, HEAD_FORMAT, HeadFiles, head_files

__all__ = ["save_head", "load_head", "HeadArtifact", "TamperedArtifactError", "UntrustedArtifactError", "TRUSTED_TYPES",
           "FinetunedModel", "is_finetuned", "load_finetuned", "read_meta", "require_fields", "verified_artifact", "feature_identity"]


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

    @property
    def temperature(self) -> float:
        """The temperature its probabilities are taken at (:func:`pipeline.heads.head_probabilities`): the one fitted on
        val for a head without ``predict_proba``; 1 for the others, and for heads saved before temperatures were kept.

        Raises:
            ValueError: a recorded temperature that is not a positive number.
        """
        t = self.meta.get("temperature")
        if t is None:
            return 1.0
        if not isinstance(t, _NUMBER) or isinstance(t, bool) or not 0 < t < float("inf"):
            raise ValueError(f"{self.path}: the field 'temperature' should be a positive number, found {brief(t)}")
        return float(t)

    def check_features(self, cache_attrs: dict) -> None:
        """Refuse features from another backbone, weights, tap or preprocessing than the head was fitted on."""
        mine = self.meta["features"]
        theirs = feature_identity(cache_attrs)
        diff = [f"{k}: head {mine.get(k)!r}, features {theirs.get(k)!r}" for k in sorted({*mine, *theirs}) if mine.get(k) != theirs.get(k)]
        if diff:
            raise ValueError(f"{self.path} was fitted on other features ({'; '.join(diff)})")


def feature_identity(attrs: dict) -> dict:
    """What makes two caches' features comparable: backbone, weights, tap, preprocessing, dtype-independent; and flip
    averaging where it is on (an absent key otherwise, so that older records still compare)."""
    settings = attrs.get("settings", attrs)
    identity = {k: settings.get(k) for k in ("model", "weights", "weights_sha256", "taps", "preprocess", "amp")}
    return {**identity, **({"flip": settings["flip"]} if "flip" in settings else {})}



_NUMBER = (int, float)
_PREPROCESS = {"resize": (int, "an integer"), "crop": (int, "an integer"), "mean": (list, "a list of 3 numbers"), "std": (list, "a list of 3 numbers")}
# The fields that readers take from metadata files, by dotted name, with the type each must have.
_FIELDS: dict[str, tuple[type | tuple[type, ...], str]] = {
    "clf": (str, "a head name"), "classes": (list, "a list of class names"), "tap": (str, "a tap name"),
    "features": (dict, "an object"), "val_accuracy": (_NUMBER, "a number"), "fit_seconds": (_NUMBER, "a number"),
    "param": (str, "a parameter name"), "value": (_NUMBER, "a number"), "preprocessing": (str, "a preprocessing name"),
    "train_cache": (dict, "an object"), "train_cache.path": (str, "a file name"),
    "val_cache": (dict, "an object"), "val_cache.path": (str, "a file name"),
    "extract_settings": (dict, "an object"), "extract_settings.model": (str, "a model name"),
    "extract_settings.weights": (str, "a weights name"), "extract_settings.taps": (list, "a list of tap names"),
    "extract_settings.preprocess": (dict, "an object"),
    **{f"extract_settings.preprocess.{k}": v for k, v in _PREPROCESS.items()},
    "model": (str, "a model name"), "preprocess": (dict, "an object"), **{f"preprocess.{k}": v for k, v in _PREPROCESS.items()},
    "dataset": (dict, "an object"), "dataset.root": (str, "a folder name"),
}
_HEAD_FIELDS = ("classes",)
_FINETUNED_FIELDS = ("model", "classes", *(f"preprocess.{k}" for k in _PREPROCESS))


def require_fields(meta_path: Path, meta: dict, names: tuple[str, ...] | list[str]) -> None:
    """Refuse metadata that lacks one of ``names`` (dotted for nested fields) or holds it with the wrong type.

    Raises:
        ValueError: naming the file and the field.
    """
    for name in names:
        kind, text = _FIELDS[name]
        value: Any = meta
        for part in name.split("."):
            if not isinstance(value, dict) or part not in value:
                raise ValueError(f"{meta_path} lacks the field {name!r}; it is not a whole metadata file (fit or train it again)")
            value = value[part]
        if not isinstance(value, kind) or (kind is _NUMBER and isinstance(value, bool)):
            raise ValueError(f"{meta_path}: the field {name!r} should be {text}, found {brief(value)}")
        if name == "classes" and not value:
            raise ValueError(f"{meta_path}: the field 'classes' should be a non-empty list of class names, found []")




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
    meta_path = head_files(path).meta  # an artifact's name, content tag and all, leads to its metadata
    if not meta_path.is_file():
        raise ValueError(f"no {what} metadata at {meta_path}; {hint}")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{meta_path} is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise ValueError(f"{meta_path} is not a {kind}")
    for field in ("artifact", "artifact_sha256"):
        if not isinstance(meta.get(field), str):
            raise ValueError(f"{meta_path} is not a whole {kind}: the field {field!r} is {'missing' if field not in meta else f'not a string ({brief(meta[field])})'}")
    require_fields(meta_path, meta, _HEAD_FIELDS if fmt == HEAD_FORMAT else _FINETUNED_FIELDS if fmt == FINETUNED_FORMAT else ())
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
        raise _GoneError(f"{meta_path} names an artifact {name!r} that is not beside it")
    return artifact


class _GoneError(ValueError):
    """A missing artifact: never written, or removed by a save that replaced the head since its metadata was read."""


def verified_artifact(meta_path: Path, meta: dict) -> Path:
    """:func:`artifact_path`, after checking that its bytes still have the sha256 recorded when it was written.

    Raises:
        TamperedArtifactError: the digests differ.
    """
    artifact = artifact_path(meta_path, meta)
    _check_digest(artifact, meta, file_sha256(artifact))
    return artifact


def _check_digest(artifact: Path, meta: dict, digest: str) -> None:
    if digest != meta["artifact_sha256"]:
        raise TamperedArtifactError(
            f"{artifact} does not match the sha256 recorded when it was written "
            f"({meta['artifact_sha256'][:16]}... expected, {digest[:16]}... found); refusing to load it"
        )


def _read_verified(meta_path: Path, meta: dict) -> tuple[Path, bytes]:
    """The artifact's path and bytes, read once and checked against the recorded sha256: what is checked is what is loaded.

    Raises:
        ValueError: see :func:`artifact_path`.
        TamperedArtifactError: the digests differ.
    """
    artifact = artifact_path(meta_path, meta)
    try:
        data = artifact.read_bytes()
    except FileNotFoundError:
        raise _GoneError(f"{meta_path} names an artifact {artifact.name!r} that is not beside it") from None
    _check_digest(artifact, meta, hashlib.sha256(data).hexdigest())
    return artifact, data


def save_head(pipe: Pipeline, meta: dict, path: str | os.PathLike) -> Path:
    """Write a fitted head and its metadata, replacing any head at ``path`` as one unit.

    Torch heads go to ``<path>.<digest>.pt`` (tensors, loadable with ``weights_only=True``); others to
    ``<path>.<digest>.skops``, named by the first 16 hex digits of their sha256. ``<path>.json`` holds the metadata,
    the artifact's name and its sha256; it is written last, and the old artifact is removed only after it. A crash
    or a full disk at any moment leaves the old head or the new one loadable, never a mix. Holds the head's lock
    (:func:`~pipeline.files.file_lock`) while it writes.

    Returns:
        The path of the JSON metadata file, which names the artifact.

    Raises:
        BusyError: another process is writing this head.
    """
    files = head_files(path)
    files.base.parent.mkdir(parents=True, exist_ok=True)
    state = torch_state(pipe)
    if state is not None:
        suffix, write = ".pt", lambda f: torch.save(state, f)
    else:
        import skops.io

        suffix, write = ".skops", lambda f: skops.io.dump(pipe, f)
    digest: list[str] = []

    def by_content(tmp: Path) -> Path:
        digest.append(file_sha256(tmp))
        return files.artifact(suffix, digest[-1])

    with file_lock(files.meta):
        for name in (files.torch, files.skops, files.meta):
            remove_stale_temps(name)
        in_use = _named_artifact(files.meta)
        artifact = atomic_write(files.torch if suffix == ".pt" else files.skops, write, rename=by_content)
        record = {**meta, "artifact": artifact.name, "artifact_sha256": digest[-1], "format": HEAD_FORMAT, "format_version": 1}
        try:
            atomic_write(files.meta, lambda f: f.write(json.dumps(record, indent=1, sort_keys=True, default=str).encode()))
        except BaseException:
            if artifact.name != in_use:  # the old head stays as it was, with nothing of the new one beside it
                artifact.unlink(missing_ok=True)
            raise
        _remove_unused_artifacts(files, artifact)
    return files.meta


def _named_artifact(meta_path: Path) -> str | None:
    """The artifact the metadata at ``meta_path`` names, if it reads."""
    try:
        return str(json.loads(meta_path.read_text())["artifact"])
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _remove_unused_artifacts(files: HeadFiles, keep: Path) -> None:
    """Remove the artifacts of a head other than ``keep``, the one its metadata names: replaced ones, and those of
    saves cut short before their metadata was written."""
    for p in files.artifacts():
        if p.name != keep.name:
            p.unlink(missing_ok=True)


def load_head(path: str | os.PathLike) -> HeadArtifact:
    """Load a head from its ``.json`` (or its ``.pt``/``.skops``), checking the recorded sha256 first.

    Nothing in the file runs: tensors are read with ``weights_only=True``, and a skops file is built only when
    every type it names is in :data:`TRUSTED_TYPES` or skops' defaults (builtins, numpy, scikit-learn estimators),
    and kept only when it is a Pipeline of head steps.

    Raises:
        ValueError: a missing or malformed metadata file, or an artifact that cannot be read.
        TamperedArtifactError: the artifact's bytes differ from the recorded digest.
        UntrustedArtifactError: an old joblib head, or a file holding types no head is made of.
    """
    for last_try in (False, True):
        meta_path, meta = read_meta(path, HEAD_FORMAT, "head", "pipeline head", "fit a head with pipeline fit-head first")
        suffix = Path(str(meta["artifact"])).suffix
        if suffix == ".joblib":
            clf = meta.get("clf", "NAME")
            raise UntrustedArtifactError(
                f"{meta_path} names a joblib (pickle) head, which is no longer loaded because unpickling can run code; "
                f"fit it again: pipeline fit-head --clf {clf} --refit"
            )
        try:
            artifact, data = _read_verified(meta_path, meta)
            break
        except _GoneError:
            # Replaced between reading its metadata and its artifact: the new metadata names the new artifact.
            if last_try:
                raise
    if suffix == ".pt":
        pipe = load_torch_head(artifact, data)
    elif suffix == ".skops":
        pipe = load_skops_head(artifact, data)
    else:
        raise ValueError(f"{meta_path} names an artifact {artifact.name!r} of no known kind; expected .pt or .skops")
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
    meta_path = head_files(path).meta
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
    state = torch_load(artifact, "fine-tuned model")
    if not isinstance(state, dict) or not isinstance(state.get("state_dict"), dict):
        found = "missing" if not isinstance(state, dict) or "state_dict" not in state else f"a {type(state['state_dict']).__name__}"
        raise ValueError(f"{artifact} is not a whole fine-tuned model: its field 'state_dict' (the weights) is {found}")
    import torchvision

    with torch.random.fork_rng(devices=[]):
        model = torchvision.models.get_model(meta["model"], weights=None)
        replace_classifier(model, len(meta["classes"]))
    try:
        missing, unexpected = model.load_state_dict(state["state_dict"], strict=False)
    except RuntimeError as e:  # tensors of the wrong shape, or not tensors
        raise ValueError(f"{artifact} does not fit {meta['model']} with {len(meta['classes'])} classes ({brief(' '.join(str(e).split()), 300)})") from None
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
