"""Model surgery for fine-tuning: a backbone's stages, freezing them, and keeping frozen norm layers in eval mode."""

from __future__ import annotations

from torch import nn

from ..backbones import final_linear

__all__ = ["backbone_stages", "apply_freeze", "set_train_mode"]

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


def backbone_stages(model: nn.Module, classifier: str | None = None) -> list[tuple[str, list[str]]]:
    """The stages of a backbone, input first, as (label, module names); the unit of ``freeze=K``.

    - ResNet/ResNeXt/Wide-ResNet: ``conv1+bn1``, then ``layer1`` ... ``layer4``.
    - RegNet: ``stem``, then the blocks of ``trunk_output``.
    - Models with a ``features`` (MobileNet, EfficientNet, ConvNeXt, VGG, DenseNet, Swin...) or ``layers``
      (MNASNet) sequence: its children.
    - Any other model: its top-level children with parameters, before the classifier's.

    Parameters held directly by the root module (e.g. ViT's ``class_token``) belong to the first stage.
    """
    if classifier is None:
        classifier, _ = final_linear(model)
    top = classifier.split(".")[0]
    children = dict(model.named_children())
    if all(n in children for n in ("conv1", "bn1", "layer1", "layer4")):
        return [("conv1+bn1", ["conv1", "bn1"])] + [(n, [n]) for n in ("layer1", "layer2", "layer3", "layer4") if n in children]
    if "stem" in children and isinstance(children.get("trunk_output"), nn.Sequential):
        blocks = [f"trunk_output.{n}" for n, _ in children["trunk_output"].named_children()]
        return [("stem", ["stem"])] + [(b, [b]) for b in blocks]
    for seq in ("features", "layers"):
        if isinstance(children.get(seq), nn.Sequential) and seq != top:
            return [(f"{seq}.{n}", [f"{seq}.{n}"]) for n, m in children[seq].named_children() if any(True for _ in m.parameters())]
    stages = []
    for n, m in children.items():
        if n == top:
            break
        if any(True for _ in m.parameters()) and n not in ("aux1", "aux2", "AuxLogits"):  # train-only side heads
            stages.append((n, [n]))
    return stages


def apply_freeze(model: nn.Module, freeze: str | int, classifier: str) -> list[str]:
    """Set ``requires_grad`` for a freezing choice; the classifier layer always trains.

    Args:
        model: the model, changed in place.
        freeze: ``none``, ``backbone`` (everything but the classifier layer) or K: the first K of
            :func:`backbone_stages`.
        classifier: the classifier layer's name.

    Returns:
        The frozen stages' labels (``["backbone"]`` for the whole backbone).

    Raises:
        ValueError: an unknown choice, or more stages than the model has.
    """
    freeze = str(freeze).strip().lower()
    model.requires_grad_(True)
    if freeze == "none":
        return []
    if freeze == "backbone":
        model.requires_grad_(False)
        model.get_submodule(classifier).requires_grad_(True)
        return ["backbone"]
    if not freeze.isdigit():
        raise ValueError(f"freeze must be none, backbone or a number of stages, got {freeze!r}")
    stages = backbone_stages(model, classifier)
    k = int(freeze)
    if k > len(stages):
        raise ValueError(
            f"cannot freeze {k} stages: {type(model).__name__} has {len(stages)} ({', '.join(s for s, _ in stages)}); "
            "use --freeze backbone to freeze all of it"
        )
    if k:
        for p in model.parameters(recurse=False):
            p.requires_grad_(False)
    for _, names in stages[:k]:
        for n in names:
            model.get_submodule(n).requires_grad_(False)
    return [s for s, _ in stages[:k]]


def set_train_mode(model: nn.Module, training: bool = True, norm: str = "train") -> nn.Module:
    """``model.train(training)``, with normalisation layers in the mode ``norm`` asks for.

    ``norm="frozen"``: every BatchNorm (and InstanceNorm with running stats) stays in eval mode, normalising with
    the running statistics it came with and never updating them; its scale and shift still train when they are
    trainable. The features a linear probe was fitted on are then exactly what the network computes at the first
    step, whatever the batch. ``norm="train"``: batch statistics in training, running statistics re-estimated, as
    ``model.train()`` does; except that a layer whose parameters are all frozen stays in eval mode, so its
    statistics do not drift while its scale and shift cannot follow.
    """
    model.train(training)
    if training:
        for m in model.modules():
            if isinstance(m, _NORMS):
                params = list(m.parameters(recurse=False))
                if norm == "frozen" or (params and not any(p.requires_grad for p in params)):
                    m.eval()
    return model
