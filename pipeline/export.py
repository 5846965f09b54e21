"""Export: a head with its frozen backbone, or a fine-tuned model, as one ONNX graph from images to probabilities.

The graph keeps the contract of :mod:`pipeline.onnx_model`: uint8 images in, normalised inside, then the backbone
up to the tap, the head's pooling and preprocessing and the head itself (converted by :mod:`pipeline.onnx_heads`),
and ``probabilities`` and ``label`` out, equal to what ``pipeline predict`` gives for the same head.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn

from . import layout, provenance
from .artifacts import is_finetuned, load_finetuned, load_head
from .files import atomic_write
from .onnx_model import INPUT, OUTPUTS
from .taps import Tap, TapExtractor

if TYPE_CHECKING:
    import onnx

__all__ = ["export"]

# A protobuf message, and so an ONNX file without external data, holds at most 2 GiB.
_MAX_BYTES = 2**31 - 1
_CONTRACT = ("Input 'images': uint8, N x crop x crop x 3 RGB, each image resized (short side to 'resize', with "
             "'interpolation') and centre-cropped to 'crop' (see the metadata); normalisation is in the graph. Outputs: "
             "'probabilities' (N x classes, float32) and 'label' (N, int64, an index into the metadata's 'classes').")


class _FromImages(nn.Module):
    """uint8 N x H x W x 3 RGB in, normalised as :class:`pipeline.backbones.Preprocess` does, then the extractor's
    first output (a head's features); or, with ``classify``, the softmax of that tap (a classifier's logits) and its argmax."""

    def __init__(self, extractor: TapExtractor, mean: Sequence[float], std: Sequence[float], classify: bool) -> None:
        super().__init__()
        self.extractor, self.classify = extractor, classify
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).reshape(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        # What ConvertImageDtype and Normalize do to a uint8 tensor: x / 255, then (x - mean) / std.
        x = (images.permute(0, 3, 1, 2).float().div(255) - self.mean) / self.std
        out = self.extractor(x)[0]
        if not self.classify:
            return out
        probabilities = torch.softmax(out, dim=1)
        return probabilities, probabilities.argmax(dim=1)


def export(head: str | os.PathLike, out: str | os.PathLike | None = None, *, weights: str | None = None) -> Path:
    """Write a head with its backbone, or a fine-tuned model, as one ONNX file (atomically).

    Args:
        head: the head's ``.json`` (or its artifact), or a fine-tuned ``model.json``.
        out: the ``.onnx`` to write; None writes ``<head>.onnx`` beside it (:func:`pipeline.layout.export_path`).
        weights: the backbone's weights file, when the head's cache was made from a local state_dict.

    Returns:
        The path written.

    Raises:
        ValueError: a missing or unreadable head, a head that cannot be converted, or a graph too large for one file.
    """
    missing = [m for m in ("onnx", "skl2onnx") if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"pipeline export needs {' and '.join(missing)}: pip install 'pipeline[export]'")
    if out is not None and Path(out).suffix.lower() != ".onnx":
        raise ValueError(f"the exported model is an .onnx file; got {out}")
    import onnx

    if is_finetuned(head):
        if weights is not None:
            raise ValueError(f"{head} is a fine-tuned model and carries its own weights; drop --weights")
        model, meta_path, props = _finetuned_graph(head)
    else:
        model, meta_path, props = _head_graph(head, weights)
    out = Path(out) if out is not None else layout.export_path(meta_path)
    props.update(format=layout.EXPORT_FORMAT, format_version=str(layout.EXPORT_FORMAT_VERSION),
                 pipeline_version=provenance.PIPELINE_VERSION, created=provenance.now(), versions=json.dumps(provenance.versions()))
    onnx.helper.set_model_props(model, {k: str(props[k]) for k in sorted(props)})
    model.producer_name, model.producer_version, model.doc_string = "pipeline", provenance.PIPELINE_VERSION, _CONTRACT
    if model.ByteSize() > _MAX_BYTES:
        raise ValueError(f"the graph of {head} takes {model.ByteSize() / 2**30:.1f} GiB, more than the 2 GiB one ONNX file holds")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise ValueError(f"the graph exported from {head} is not valid ONNX ({str(e).strip().splitlines()[0]})") from None
    data = model.SerializeToString()
    out.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(out, lambda f: f.write(data), hint=" (the export writes the whole file again)")


def _head_graph(path: str | os.PathLike, weights: str | None) -> tuple[onnx.ModelProto, Path, dict]:
    from .heads import has_probabilities
    from .onnx_heads import FEATURES, head_model
    from .predict import head_backbone

    art = load_head(path)
    clf = art.meta.get("clf", "head")
    backbone, extractor = head_backbone(art, weights)
    pre = backbone.preprocess
    with extractor:
        graph, shapes = _trace(_FromImages(extractor, pre.mean, pre.std, classify=False), pre.crop, ["features"])
    fitted = getattr(art.pipeline.steps[0][1], "input_shape_", None)
    if fitted is not None and tuple(fitted) != shapes[0]:
        raise ValueError(f"{art.path}: the backbone's tap {art.meta['tap']} gives features of shape {shapes[0]}, the head was fitted on {tuple(fitted)}")
    try:
        head = head_model(art.pipeline, shapes[0], len(art.classes), art.temperature)
    except ValueError as e:
        raise ValueError(f"{art.path}: the {clf} head cannot be exported: {e}") from None
    probabilities = ("predict_proba" if has_probabilities(art.pipeline) else
                     f"softmax of the decision values over the temperature {art.temperature:.6g} (two classes: softmax([0, d] / T))")
    props = _props(art.classes, backbone.name, backbone.weights, backbone.weights_sha256, art.meta["tap"], clf, art.meta, pre.to_dict(), probabilities)
    return _join(graph, head, FEATURES), art.path, props


def _finetuned_graph(path: str | os.PathLike) -> tuple[onnx.ModelProto, Path, dict]:
    from .backbones import final_linear

    fm = load_finetuned(path)
    layer = fm.meta.get("classifier") or final_linear(fm.model)[0]
    pre = fm.preprocess
    with TapExtractor(fm.model, [Tap(layer, "output")]) as extractor:
        graph, _ = _trace(_FromImages(extractor, pre.mean, pre.std, classify=True), pre.crop, list(OUTPUTS))
    props = _props(fm.classes, fm.meta["model"], fm.meta.get("weights"), fm.meta.get("weights_sha256"), f"{layer}:output", "finetune",
                   fm.meta, pre.to_dict(), "softmax of the logits")
    return graph, fm.path, props


def _props(classes: list[str], model: str, weights: str | None, weights_sha256: str | None, tap: str, head: str, meta: dict,
           preprocess: dict, probabilities: str) -> dict:
    """The metadata that says what the graph is, where it came from, and how to prepare its images."""
    return {"classes": json.dumps(list(classes)), "model": model, "weights": weights or "", "weights_sha256": weights_sha256 or "",
            "tap": tap, "head": head, "head_file": meta["artifact"], "head_sha256": meta["artifact_sha256"], "probabilities": probabilities,
            "resize": preprocess["resize"], "crop": preprocess["crop"], "interpolation": preprocess.get("interpolation", "bilinear"),
            "mean": json.dumps(list(preprocess["mean"])), "std": json.dumps(list(preprocess["std"]))}


def _trace(module: nn.Module, crop: int, outputs: list[str]) -> tuple[onnx.ModelProto, list[tuple[int, ...]]]:
    """The module exported by torch's TorchScript exporter (as the ONNX engine does, hooks in place), and the
    shape of one row of each output."""
    import onnx

    from .onnx_heads import OPSET

    example = torch.randint(0, 256, (2, crop, crop, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        module.eval()
        result = module(example)
        shapes = [tuple(t.shape[1:]) for t in (result if isinstance(result, tuple) else (result,))]
        torch.onnx.export(module, (example,), buffer, dynamo=False, opset_version=OPSET, input_names=[INPUT], output_names=outputs,
                          dynamic_axes={INPUT: {0: "batch"}, **{name: {0: "batch"} for name in outputs}})
    return onnx.load_from_string(buffer.getvalue()), shapes


def _join(backbone: onnx.ModelProto, head: onnx.ModelProto, head_input: str) -> onnx.ModelProto:
    """The backbone's graph feeding the head's: one graph from ``images`` to the contract's outputs."""
    from onnx import compose

    version = max(backbone.ir_version, head.ir_version)
    backbone.ir_version = head.ir_version = version
    # Every name of the backbone gets a prefix but its input, so that none meets a name of the head's graph.
    backbone = compose.add_prefix(backbone, "backbone_", rename_inputs=False)
    return compose.merge_models(backbone, head, io_map=[("backbone_features", head_input)], outputs=list(OUTPUTS))

