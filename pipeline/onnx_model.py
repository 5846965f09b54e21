"""An exported model: the contract its ONNX graph keeps, and running it on images with ONNX Runtime alone.

The contract (README, "Exporting a model"): one input, ``images``, uint8, N x crop x crop x 3 RGB, each image
resized and centre-cropped as the metadata says (``resize``, ``crop``, ``interpolation``); normalisation is in
the graph. Two outputs: ``probabilities`` (N x classes, float32) and ``label`` (N, int64, an index into the
metadata's ``classes``). Nothing here imports torch or scikit-learn.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .images import UnreadableImageError, load_rgb, resize_crop, scan_inputs
from .layout import EXPORT_FORMAT, EXPORT_FORMAT_VERSION

__all__ = ["INPUT", "OUTPUTS", "METADATA", "OnnxModel", "load_onnx_model", "predict_onnx"]

INPUT = "images"
OUTPUTS = ("probabilities", "label")
METADATA = ("format", "format_version", "classes", "model", "weights", "weights_sha256", "tap", "head", "head_file", "head_sha256",
            "probabilities", "resize", "crop", "interpolation", "mean", "std", "pipeline_version", "versions", "created")
"""The keys of an exported model's ``metadata_props``, all strings (``classes``, ``mean``, ``std`` and ``versions`` as JSON)."""


@dataclass
class OnnxModel:
    """An exported model loaded in ONNX Runtime, with what its metadata says."""

    session: Any
    metadata: dict[str, str]
    path: Path

    @property
    def classes(self) -> list[str]:
        return list(json.loads(self.metadata["classes"]))

    def image(self, path: str | os.PathLike) -> np.ndarray:
        """One image file as the graph takes it: decoded to RGB, resized and centre-cropped, crop x crop x 3 uint8.

        Raises:
            UnreadableImageError: the file cannot be decoded.
        """
        m = self.metadata
        return resize_crop(load_rgb(path), int(m["resize"]), int(m["crop"]), m["interpolation"])

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(probabilities, label)`` of a N x crop x crop x 3 uint8 batch."""
        probabilities, label = self.session.run(list(OUTPUTS), {INPUT: np.ascontiguousarray(images, dtype=np.uint8)})
        return probabilities, label


def load_onnx_model(path: str | os.PathLike) -> OnnxModel:
    """Open a model written by ``pipeline export`` in ONNX Runtime, checking that it keeps the contract.

    Raises:
        ValueError: a missing file, a file ONNX Runtime cannot read, or an ONNX model that pipeline did not export.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no exported model at {path}; write one with pipeline export HEAD -o {path}")
    try:
        import onnxruntime as ort
    except ImportError:
        raise ValueError("running an exported model needs onnxruntime: pip install 'pipeline[fast]'") from None
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 4  # a graph it cannot load is reported once, by the ValueError below
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own types for unreadable or invalid graphs
        raise ValueError(f"{path} is not a readable ONNX model ({type(e).__name__}: {str(e).strip().splitlines()[0]})") from None
    meta = dict(session.get_modelmeta().custom_metadata_map)
    if meta.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path} is an ONNX model but not one written by pipeline export (no format {EXPORT_FORMAT!r} in its metadata)")
    if int(meta.get("format_version", 0)) > EXPORT_FORMAT_VERSION:
        raise ValueError(f"{path} is an exported model of format version {meta['format_version']}; this pipeline reads up to {EXPORT_FORMAT_VERSION}")
    inputs, outputs = [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()]
    missing = [k for k in METADATA if k not in meta]
    if inputs != [INPUT] or sorted(outputs) != sorted(OUTPUTS) or missing:
        raise ValueError(f"{path} does not keep the exported model's contract (inputs {inputs}, outputs {outputs}, missing metadata {missing})")
    return OnnxModel(session, meta, path)


def predict_onnx(path: str | os.PathLike, inputs: Sequence[str | os.PathLike], *, on_error: str = "fail",
                 batch_size: int = 64) -> tuple[list[dict], list[str]]:
    """Predict images with an exported model, as :func:`pipeline.predict.predict` does with the head it came from.

    Args:
        path: the ``.onnx`` file.
        inputs: image files and folders.
        on_error: ``fail`` on an unreadable file, or ``skip`` it (its row carries the error).
        batch_size: images per run of the graph.

    Returns:
        (rows, classes), the rows of :func:`pipeline.predict.predict`.
    """
    from .predict import prediction_rows

    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be fail or skip, got {on_error!r}")
    model = load_onnx_model(path)
    classes = model.classes
    found = scan_inputs(inputs)
    found.check(on_error)
    paths = found.paths
    rows: dict[int, dict] = {}
    for start in range(0, len(paths), batch_size):
        good, images = [], []
        for i in range(start, min(start + batch_size, len(paths))):
            try:
                images.append(model.image(paths[i]))
                good.append(i)
            except UnreadableImageError as e:
                if on_error == "fail":
                    raise ValueError(f"{paths[i]}: {e.reason}; fix or remove the file, or pass --on-error skip") from None
                rows[i] = {"path": paths[i], "error": e.reason}
        if images:
            probabilities, _ = model(np.stack(images))
            rows.update(prediction_rows(good, [paths[i] for i in good], probabilities, classes))
    return found.rows(rows), classes
