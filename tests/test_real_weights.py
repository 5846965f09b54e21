"""The real offline MobileNetV2 ImageNet weights on a real photo: the tap gives the model's own answer."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import ExtractConfig, extract, load_backbone, read_cache
from pipeline.backbones import WeightsUnavailableError

pytestmark = pytest.mark.weights


@pytest.fixture(scope="module")
def mobilenet():
    try:
        return load_backbone("mobilenet_v2", "IMAGENET1K_V1")
    except WeightsUnavailableError:
        if os.environ.get("CI"):
            raise  # make test runs make assets first; in CI a missing file is a failure, not a skip
        pytest.skip("real MobileNetV2 weights not in the torch hub cache: run `make assets`")


@pytest.fixture
def china(tmp_path: Path) -> Path:
    from sklearn.datasets import load_sample_images

    photos = load_sample_images()
    name = [os.path.basename(f) for f in photos.filenames].index("china.jpg")
    root = tmp_path / "photos"
    (root / "test" / "palace").mkdir(parents=True)
    Image.fromarray(photos.images[name]).save(root / "test" / "palace" / "china.jpg", quality=95)
    return root


def test_tap_through_classifier_gives_the_models_top1_and_it_is_sensible(mobilenet, china: Path) -> None:
    config = ExtractConfig(data=str(china), split="test", model="mobilenet_v2", weights="IMAGENET1K_V1", workers=0, device="cpu", engine="eager")
    result = extract(config, progress=False)
    with read_cache(result.path) as c:
        feats = torch.from_numpy(c.features())
        assert c.attrs["weights"] == "IMAGENET1K_V1" and c.attrs["preprocess"]["crop"] == 224
    model = mobilenet.model
    image = mobilenet.preprocess.transform()(Image.open(china / "test" / "palace" / "china.jpg").convert("RGB"))
    with torch.no_grad():
        logits = model(image[None])
        from_tap = model.classifier(feats)
    torch.testing.assert_close(from_tap, logits, rtol=0, atol=1e-4)
    top1 = int(from_tap.argmax())
    assert top1 == int(logits.argmax())
    top5 = [mobilenet.categories[i] for i in from_tap[0].topk(5).indices.tolist()]
    assert mobilenet.categories[top1] == "palace", top5


def test_weights_preprocessing_is_the_weights_own(mobilenet, china: Path) -> None:
    from torchvision.models import MobileNet_V2_Weights

    img = Image.open(china / "test" / "palace" / "china.jpg").convert("RGB")
    ours = mobilenet.preprocess.transform()(img)
    theirs = MobileNet_V2_Weights.IMAGENET1K_V1.transforms()(img)
    np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=0, atol=1e-6)
