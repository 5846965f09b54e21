"""Taps: forward hooks that capture the input or output of named modules, and the listing of tap points."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from .config import CAPTURES, JOIN, tap_parts

__all__ = ["Tap", "FeatureHooks", "TapExtractor", "default_tap", "resolve_taps", "list_taps", "TapInfo", "JOIN", "tap_parts", "joined"]

def joined(parts: Sequence) -> "np.ndarray | torch.Tensor":
    """The features of several taps side by side, N x (D1 + D2 + ...): spatial maps (N x C x H x W) averaged over
    H and W, every other part flattened. NumPy arrays are joined in float32, tensors in their own dtype.

    The one rule for joined taps: cached features are joined by it when read, an extractor's when computed."""
    if isinstance(parts[0], torch.Tensor):
        return torch.cat([p.mean((2, 3)) if p.ndim == 4 else p.flatten(1) for p in parts], 1)
    flat = [np.asarray(p, dtype=np.float32) for p in parts]
    return np.concatenate([p.mean((2, 3)) if p.ndim == 4 else p.reshape(len(p), -1) for p in flat], 1)


class TapNotFiredError(ValueError, RuntimeError):
    """A tapped module that the forward pass never called (a bad choice of layer, so a ValueError)."""


@dataclass(frozen=True)
class Tap:
    """A tap point: the input or output of the module called ``layer``."""

    layer: str
    capture: str = "output"

    @property
    def name(self) -> str:
        """The tap's name, as written on the command line and in caches: ``layer:capture``."""
        return f"{self.layer}:{self.capture}"

    @property
    def slug(self) -> str:
        """The tap's name in file paths."""
        return f"{self.layer}-{self.capture}"

    @classmethod
    def parse(cls, spec: str, capture: str = "output") -> "Tap":
        """Parse ``layer`` or ``layer:input|output``; a bare layer takes ``capture``."""
        layer, sep, cap = spec.rpartition(":")
        if not sep:
            layer, cap = spec, capture
        if cap not in CAPTURES:
            raise ValueError(f"tap {spec!r}: capture must be 'input' or 'output', got {cap!r}")
        return cls(layer, cap)


def _top_level_of_last_linear(model: nn.Module) -> str | None:
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    return None if last is None else last.split(".")[0]


def default_tap(model: nn.Module) -> Tap:
    """The avgpool output, or the input of the final classifier for models without an ``avgpool`` module.

    torchvision's MobileNetV2 pools with a functional call, so its pooled features are the input of ``classifier``.
    """
    modules = dict(model.named_modules())
    if "avgpool" in modules:
        return Tap("avgpool", "output")
    head = _top_level_of_last_linear(model)
    if head is None:
        raise ValueError(f"{type(model).__name__} has neither an avgpool module nor a linear classifier; name a tap with --layer")
    return Tap(head, "input")


def resolve_taps(model: nn.Module, specs: Sequence[str] = (), capture: str = "output") -> list[Tap]:
    """Parse and check tap specs against the model's module names; no specs means the default tap.

    Raises:
        ValueError: an unknown module name (with close matches and the full list), or a repeated tap.
    """
    if not specs:
        return [default_tap(model)]
    names = [n for n, _ in model.named_modules() if n]
    taps = [Tap.parse(s, capture) for s in specs]
    for tap in taps:
        if tap.layer not in names:
            hint = difflib.get_close_matches(tap.layer, names, n=3)
            raise ValueError(
                f"{type(model).__name__} has no module {tap.layer!r}"
                + (f"; did you mean {', '.join(hint)}?" if hint else "")
                + f" Top-level modules: {', '.join(n for n in names if '.' not in n)}"
                + " (`pipeline layers MODEL` lists every tap point)"
            )
    if len({t.name for t in taps}) != len(taps):
        raise ValueError(f"a tap is named twice: {[t.name for t in taps]}")
    return taps


class FeatureHooks:
    """Forward hooks on named modules, owned by a context manager.

    Captured tensors are stored by tap name and cleared when read with :meth:`pop`. On exit the hooks are
    removed (also on error) and the model's train/eval mode is restored.
    """

    def __init__(self, model: nn.Module, taps: Iterable[Tap]) -> None:
        self.model = model
        self.taps = list(taps)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._store: dict[str, torch.Tensor] = {}
        self._was_training: bool | None = None

    def _hook(self, tap: Tap):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if tap.capture == "input":
                if not args or not isinstance(args[0], torch.Tensor):
                    raise ValueError(f"tap {tap.name}: the module was called without a tensor input")
                self._store[tap.name] = args[0]
            else:
                if not isinstance(output, torch.Tensor):
                    raise ValueError(f"tap {tap.name}: the module returns {type(output).__name__}, not a tensor")
                self._store[tap.name] = output

        return hook

    def __enter__(self) -> "FeatureHooks":
        self._was_training = self.model.training
        modules = dict(self.model.named_modules())
        try:
            for tap in self.taps:
                self._handles.append(modules[tap.layer].register_forward_hook(self._hook(tap)))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove the hooks, drop captured tensors and restore the model's mode."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._store.clear()
        if self._was_training is not None:
            self.model.train(self._was_training)

    def pop(self) -> dict[str, torch.Tensor]:
        """Return the tensors captured by the last forward, by tap name, and forget them."""
        missing = [t.name for t in self.taps if t.name not in self._store]
        if missing:
            raise TapNotFiredError(f"tap(s) {missing} did not fire during the forward pass; is the module used by forward()?")
        out, self._store = self._store, {}
        return out


_GLOBAL_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def _flattens(model: nn.Module, tap: Tap) -> bool:
    """Whether a tap is a global pool's output, stored as N x C rather than N x C x 1 x 1."""
    return tap.capture == "output" and isinstance(dict(model.named_modules())[tap.layer], _GLOBAL_POOLS)


class TapExtractor(nn.Module):
    """A module whose forward returns the tapped features of ``model`` as a tuple, one per tap.

    Use it as a context manager: the hooks live only inside the ``with`` block. The output of a global pool
    (``AdaptiveAvgPool2d``, ``AdaptiveMaxPool2d``) is flattened from N x C x 1 x 1 to N x C; other taps keep their shape. It is the unit both engines run: eagerly, or exported to ONNX with the hooks in place.

    Args:
        model: the backbone, in eval mode while the extractor runs.
        taps: where to capture.
        flip: average each image's features with its horizontal mirror's, from one forward pass over both (twice
            the work); a spatial map of the mirror (N x C x H x W, as torchvision's CNNs lay them out) is mirrored back
            first, so that its positions line up. Other layouts (a Swin's N x H x W x C, a ViT's tokens) are averaged
            as they come, position for position.
        join: return one tensor, the taps :func:`joined`, instead of one per tap.
    """

    def __init__(self, model: nn.Module, taps: Sequence[Tap], *, flip: bool = False, join: bool = False) -> None:
        super().__init__()
        self.model = model
        self.taps = list(taps)
        self.flip, self.join = flip, join
        self.hooks = FeatureHooks(model, self.taps)
        self._flatten = [_flattens(model, t) for t in self.taps]

    @property
    def n_outputs(self) -> int:
        """How many tensors forward returns."""
        return 1 if self.join else len(self.taps)

    def __enter__(self) -> "TapExtractor":
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.hooks.close()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self.model(torch.cat([x, x.flip(-1)]) if self.flip else x)
        got = self.hooks.pop()
        outs = []
        for tap, flat in zip(self.taps, self._flatten):
            out = got[tap.name]
            if self.flip:
                # The batch's two halves, as a reshape rather than len(x), so an exported graph keeps its batch size free.
                pair = out.reshape(2, -1, *out.shape[1:])
                out = (pair[0] + (pair[1].flip(-1) if out.ndim == 4 else pair[1])) / 2
            outs.append(out.flatten(1) if flat else out)
        return (joined(outs),) if self.join else tuple(outs)


@dataclass(frozen=True)
class TapInfo:
    """A module of a model with the shapes flowing in and out of it for one image."""

    name: str
    kind: str
    input_shape: tuple[int, ...] | None
    output_shape: tuple[int, ...] | None


def list_taps(model: nn.Module, image_size: int = 224) -> list[TapInfo]:
    """Every named module with its input and output shape (batch dimension dropped) for one image."""
    shapes: dict[str, tuple] = {}
    handles = []

    def shape_of(x: object) -> tuple[int, ...] | None:
        return tuple(x.shape[1:]) if isinstance(x, torch.Tensor) else None

    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_hook(
                lambda m, a, o, name=name: shapes.__setitem__(name, (shape_of(a[0]) if a else None, shape_of(o)))
            ))
    was_training = model.training
    try:
        model.eval()
        with torch.inference_mode():
            model(torch.zeros(1, 3, image_size, image_size))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return [
        TapInfo(name, type(module).__name__, *shapes.get(name, (None, None)))
        for name, module in model.named_modules()
        if name
    ]
