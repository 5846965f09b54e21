"""Runtime: device choice and the one switch for the fast CUDA path (bf16 autocast, channels_last, pinned memory)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch

__all__ = ["Runtime", "resolve_runtime", "torch_threads"]


@dataclass(frozen=True)
class Runtime:
    """Where the backbone runs and whether the fast path is on.

    Attributes:
        device: the torch device.
        amp: the one switch. On: bf16 autocast, channels_last tensors and, on CUDA, pinned host memory with
            non-blocking copies. Off: plain fp32, bit-for-bit the eager reference.
    """

    device: torch.device
    amp: bool

    @property
    def pin_memory(self) -> bool:
        return self.amp and self.device.type == "cuda"

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.amp else torch.contiguous_format

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast when the switch is on, else a no-op."""
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def prepare(self, module: torch.nn.Module) -> torch.nn.Module:
        """Move a module to the device, in channels_last when the switch is on."""
        return module.to(self.device, memory_format=self.memory_format)

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        """Move a batch to the device; non-blocking from pinned memory when the switch is on."""
        return x.to(self.device, non_blocking=self.pin_memory, memory_format=self.memory_format)

    def describe(self) -> str:
        return f"{self.device.type}" + (" (bf16 autocast, channels_last)" if self.amp else " (fp32)")


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads, then restore the caller's number."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def resolve_runtime(device: str = "auto", amp: bool | None = None) -> Runtime:
    """Pick the device (cuda > mps > cpu for ``auto``) and the fast-path switch (default: on for CUDA only).

    Raises:
        ValueError: a named device that is not available.
    """
    device = (device or "auto").lower()
    if device == "auto":
        if torch.cuda.is_available():
            device = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; expected auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA device")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("--device mps was asked for, but MPS is not available")
    return Runtime(device=dev, amp=(dev.type == "cuda") if amp is None else bool(amp))
