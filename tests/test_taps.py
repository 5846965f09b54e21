"""The hooks capture what the model computes: equivalence with the model's own layers and logits."""

from __future__ import annotations

import pytest
import torch
import torchvision

from pipeline.taps import FeatureHooks, Tap, TapExtractor, default_tap, joined, list_taps, resolve_taps, tap_parts


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=7).eval()
    # Random BatchNorm statistics are the identity; give them some spread so the test has teeth.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnet_avgpool_output_through_fc_gives_logits(name: str, x: torch.Tensor) -> None:
    model = _model(name)
    with FeatureHooks(model, [Tap("avgpool", "output"), Tap("avgpool", "input")]) as hooks, torch.no_grad():
        logits = model(x)
        got = hooks.pop()
    pooled = got["avgpool:output"].flatten(1)
    torch.testing.assert_close(model.fc(pooled), logits, rtol=0, atol=1e-5)
    # The avgpool input, averaged over space, is the avgpool output.
    torch.testing.assert_close(got["avgpool:input"].mean(dim=(2, 3)), pooled, rtol=0, atol=1e-6)
    assert got["avgpool:input"].shape[1:] == (model.fc.in_features, 2, 2)


def test_mobilenet_v2_default_tap_through_classifier_gives_logits(x: torch.Tensor) -> None:
    model = _model("mobilenet_v2")
    tap = default_tap(model)
    assert tap == Tap("classifier", "input")
    with FeatureHooks(model, [tap, Tap("features", "output")]) as hooks, torch.no_grad():
        logits = model(x)
        got = hooks.pop()
    torch.testing.assert_close(model.classifier(got["classifier:input"]), logits, rtol=0, atol=1e-5)
    # torchvision pools MobileNetV2 in forward(): the "avgpool input" is the output of features.
    torch.testing.assert_close(got["features:output"].mean(dim=(2, 3)), got["classifier:input"], rtol=0, atol=1e-6)


def test_tap_extractor_flattens_pooled_outputs_and_keeps_spatial(x: torch.Tensor) -> None:
    model = _model("resnet18")
    with TapExtractor(model, [Tap("avgpool"), Tap("layer4")]) as ex, torch.no_grad():
        pooled, spatial = ex(x)
        logits = model(x)
    assert pooled.shape == (3, 512) and spatial.shape == (3, 512, 2, 2)
    torch.testing.assert_close(model.fc(pooled), logits, rtol=0, atol=1e-5)


def test_hooks_are_removed_and_mode_restored_even_on_error(x: torch.Tensor) -> None:
    model = _model("resnet18").train()
    with pytest.raises(RuntimeError, match="boom"):
        with FeatureHooks(model, [Tap("avgpool")]):
            model.eval()
            raise RuntimeError("boom")
    assert all(not m._forward_hooks for m in model.modules())
    assert model.training


def test_pop_clears_and_a_tap_that_did_not_fire_is_an_error(x: torch.Tensor) -> None:
    model = _model("resnet18")
    with FeatureHooks(model, [Tap("avgpool")]) as hooks, torch.no_grad():
        model(x)
        hooks.pop()
        with pytest.raises(RuntimeError, match=r"tap\(s\) \['avgpool:output'\] did not fire"):
            hooks.pop()


def test_unknown_layer_names_close_matches_and_valid_names() -> None:
    model = _model("resnet18")
    with pytest.raises(ValueError, match=r"ResNet has no module 'avgpol'; did you mean avgpool, maxpool\? Top-level modules: conv1, bn1, relu, maxpool, layer1, layer2, layer3, layer4, avgpool, fc \(`pipeline layers MODEL`"):
        resolve_taps(model, ["avgpol"])
    with pytest.raises(ValueError, match="capture must be 'input' or 'output', got 'middle'"):
        resolve_taps(model, ["avgpool:middle"])


def test_resolve_taps_parses_capture_and_defaults() -> None:
    model = _model("resnet18")
    assert resolve_taps(model) == [Tap("avgpool", "output")]
    assert resolve_taps(model, ["layer4.1", "avgpool:input"], capture="input") == [Tap("layer4.1", "input"), Tap("avgpool", "input")]


def test_list_taps_reports_shapes() -> None:
    infos = {i.name: i for i in list_taps(_model("resnet18"), image_size=64)}
    assert infos["avgpool"].input_shape == (512, 2, 2)
    assert infos["avgpool"].output_shape == (512, 1, 1)
    assert infos["fc"].output_shape == (7,)
    assert not any(m._forward_hooks for m in _model("resnet18").modules())


# ---------------------------------------------------------------- flip averaging and joined taps


def test_flip_averages_each_image_with_its_mirror_and_mirrors_spatial_maps_back(x: torch.Tensor) -> None:
    model = _model("resnet18")  # a random MobileNetV2's pooled features hardly depend on the image
    taps = [Tap("layer3"), Tap("avgpool")]
    with TapExtractor(model, taps) as plain, torch.no_grad():
        spatial, pooled = plain(x)
        spatial_m, pooled_m = plain(x.flip(-1))
    with TapExtractor(model, taps, flip=True) as flipped, torch.no_grad():
        got_spatial, got_pooled = flipped(x)
    torch.testing.assert_close(got_pooled, (pooled + pooled_m) / 2, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_spatial, (spatial + spatial_m.flip(-1)) / 2, rtol=0, atol=1e-5)
    assert not torch.allclose(pooled, pooled_m, atol=1e-3)  # the mirror is another input: the average is not the plain features


def test_joined_taps_average_spatial_maps_and_sit_side_by_side(x: torch.Tensor) -> None:
    model = _model("mobilenet_v2")
    taps = [Tap("features.13"), Tap("classifier", "input")]
    with TapExtractor(model, taps) as plain, torch.no_grad():
        spatial, pooled = plain(x)
    with TapExtractor(model, taps, join=True) as join, torch.no_grad():
        assert join.n_outputs == 1
        (got,) = join(x)
    assert got.shape == (3, 96 + 1280)
    torch.testing.assert_close(got[:, :96], spatial.mean((2, 3)), rtol=0, atol=0)
    torch.testing.assert_close(got[:, 96:], pooled, rtol=0, atol=0)
    # Cached arrays are joined by the same rule, in float32 whatever their storage.
    from_arrays = joined([spatial.numpy().astype("float16"), pooled.numpy()])
    assert from_arrays.dtype == "float32"
    torch.testing.assert_close(torch.from_numpy(from_arrays), got, rtol=1e-3, atol=1e-3)
    assert tap_parts("features.13:output+classifier:input") == ["features.13:output", "classifier:input"] and tap_parts("a:output") == ["a:output"]
