"""The command line: help for every command, extract's output, one-line errors, layers/info/models, pipeline.toml."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from pipeline import ExtractConfig, read_cache
from pipeline.cli import cli


# What tiny() sets, as options: random-weight MobileNetV2 at 32 px on the CPU, no workers.
TINY = ["--weights", "none", "--crop", "32", "--resize", "36", "--batch-size", "4", "--workers", "0",
        "--engine", "eager", "--device", "cpu", "--no-progress"]
TEST_CACHE = Path("features/ds/mobilenet_v2-none/classifier-input/test.h5")


def _run(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def _extract(data: Path, *args: str) -> Result:
    return _run("extract", "--data", str(data), *TINY, *args)


def _ok(result: Result) -> str:
    assert result.exit_code == 0, result.output
    assert result.exception is None
    return result.output


def _error(result: Result) -> str:
    """The CLI failed the friendly way: exit 1, one line starting 'Error:', no traceback; returns the message."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # not an unhandled exception
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("Error: ")
    return lines[0][len("Error: "):]


def _usage_error(result: Result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.output.startswith("Usage: ")
    return result.output.strip().splitlines()[-1]


# ---------------------------------------------------------------- help


def test_group_help_lists_every_command() -> None:
    out = _ok(_run("--help"))
    assert out.startswith("Usage: cli [OPTIONS] COMMAND [ARGS]...")
    for name in cli.commands:
        assert re.search(rf"^  {name} ", out, re.M), name
    assert _ok(_run("-h")) == out


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_every_command_has_help(name: str) -> None:
    out = _ok(_run(name, "--help"))
    assert out.startswith(f"Usage: cli {name} [OPTIONS]")
    first_words = " ".join(cli.commands[name].help.split()[:4])
    assert first_words in " ".join(out.split())
    assert "-h, --help" in out


def test_version() -> None:
    assert re.fullmatch(r"cli, version \d+\.\d+\.\d+\n", _ok(_run("--version")))


# ---------------------------------------------------------------- extract: success


def test_extract_prints_the_cache_then_up_to_date(image_folder: Path) -> None:
    out = _ok(_extract(image_folder, "--split", "test"))
    assert re.fullmatch(rf"test: {re.escape(str(TEST_CACHE))}  9 images, 0 skipped, \d+\.\d img/s \(eager\)\n", out)
    with read_cache(TEST_CACHE) as c:
        assert len(c) == 9 and c.attrs["preprocess"]["crop"] == 32 and c.attrs["weights"] == "none"
    again = _ok(_extract(image_folder, "--split", "test"))
    assert again == f"test: {TEST_CACHE} is up to date (9 images); nothing to do\n"


def test_extract_two_splits(image_folder: Path) -> None:
    out = _ok(_extract(image_folder, "--split", "train", "--split", "test"))
    lines = out.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"train: {TEST_CACHE.with_name('train.h5')}  27 images, 0 skipped, ")
    assert lines[1].startswith(f"test: {TEST_CACHE}  9 images, 0 skipped, ")
    with read_cache(TEST_CACHE.with_name("train.h5")) as c:
        assert len(c) == 27  # 30 minus the carved val
    with read_cache(TEST_CACHE) as c:
        assert len(c) == 9


def test_output_writes_one_split_there_and_refuses_two(image_folder: Path) -> None:
    out = _ok(_extract(image_folder, "--split", "test", "--output", "one.h5"))
    assert out.startswith("test: one.h5  9 images, 0 skipped, ")
    with read_cache("one.h5") as c:
        assert len(c) == 9
    result = _extract(image_folder, "--split", "train", "--split", "test", "-o", "two.h5")
    assert _usage_error(result) == "Error: Invalid value for --output: --output takes one --split"
    assert not Path("two.h5").exists()


def test_skipped_files_are_listed(image_folder: Path) -> None:
    (image_folder / "test" / "bee" / "notes.txt").write_text("x")
    (image_folder / "test" / "cat" / "empty.png").write_bytes(b"")
    out = _ok(_extract(image_folder, "--split", "test", "--on-error", "skip"))
    lines = out.splitlines()
    assert lines[0].startswith(f"test: {TEST_CACHE}  9 images, 2 skipped, ")
    assert lines[1:] == ["  skipped test/bee/notes.txt: not an image file (extension '.txt')", "  skipped test/cat/empty.png: empty file (0 bytes)"]


# ---------------------------------------------------------------- extract: errors


def test_unknown_model(image_folder: Path) -> None:
    msg = _error(_extract(image_folder, "--split", "test", "--model", "resnet5"))
    assert msg.startswith("unknown model 'resnet5'; did you mean resnet50")
    assert msg.endswith("? (pipeline models lists all torchvision classifiers)")
    msg = _error(_extract(image_folder, "--split", "test", "--model", "zzzz"))
    assert msg == "unknown model 'zzzz' (pipeline models lists all torchvision classifiers)"


def test_unknown_weights_name(image_folder: Path) -> None:
    msg = _error(_extract(image_folder, "--split", "test", "--weights", "IMAGENET9K"))
    assert msg == "unknown weights 'IMAGENET9K' for mobilenet_v2; expected one of DEFAULT, IMAGENET1K_V1, IMAGENET1K_V2, a state_dict file, or 'none'"


def test_missing_weights_file(image_folder: Path) -> None:
    msg = _error(_extract(image_folder, "--split", "test", "--weights", "missing/weights.pth"))
    assert msg == "weights file missing/weights.pth not found"


def test_named_weights_unavailable_offline(image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    msg = _error(_extract(image_folder, "--split", "test", "--model", "resnet18", "--weights", "IMAGENET1K_V1"))
    checkpoints = tmp_path / "empty-torch-home" / "hub" / "checkpoints"
    assert msg.startswith(f"resnet18 IMAGENET1K_V1 weights are not in {checkpoints} and PIPELINE_OFFLINE is set. ")
    assert f"Provide them by copying the file to {checkpoints / 'resnet18-f37072fd.pth'}" in msg
    assert "or by passing --weights /path/to/state_dict.pth" in msg
    assert msg.endswith("Random weights must be asked for: --weights none.")
    assert not Path("features").exists()


def test_missing_dataset_folder() -> None:
    assert _error(_extract(Path("nope"), "--split", "test")) == "dataset folder nope not found"


def test_bad_file_under_the_default_policy(image_folder: Path) -> None:
    (image_folder / "test" / "ant" / "notes.txt").write_text("x")
    msg = _error(_extract(image_folder, "--split", "test"))
    assert msg == f"{image_folder / 'test' / 'ant' / 'notes.txt'}: not an image file (extension '.txt'); remove it or pass --on-error skip"
    (image_folder / "test" / "ant" / "notes.txt").unlink()
    (image_folder / "test" / "bee" / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    msg = _error(_extract(image_folder, "--split", "test"))
    assert re.fullmatch(
        re.escape(str(image_folder / "test" / "bee" / "x.png")) + r": cannot decode image \(.+\); fix or remove the file, or pass --on-error skip", msg
    ), msg


def test_unknown_layer(image_folder: Path) -> None:
    msg = _error(_extract(image_folder, "--split", "test", "--layer", "clasifier"))
    assert msg.startswith("MobileNetV2 has no module 'clasifier'; did you mean classifier")
    assert "Top-level modules: features, classifier" in msg
    assert msg.endswith("(`pipeline layers MODEL` lists every tap point)")
    msg = _error(_extract(image_folder, "--split", "test", "--layer", "classifier:inside"))
    assert msg == "tap 'classifier:inside': capture must be 'input' or 'output', got 'inside'"


def test_other_settings_need_force(image_folder: Path) -> None:
    _ok(_extract(image_folder, "--split", "test"))
    msg = _error(_extract(image_folder, "--split", "test", "--dtype", "float16"))
    assert msg == f"{TEST_CACHE} was made with other settings (dtype: 'float32' -> 'float16'); pass --force to overwrite it"
    out = _ok(_extract(image_folder, "--split", "test", "--dtype", "float16", "--force"))
    assert out.startswith(f"test: {TEST_CACHE}  9 images")
    with read_cache(TEST_CACHE) as c:
        assert c.attrs["dtype"] == "float16"


@pytest.mark.parametrize(("value", "why"), [
    ("1,2", "expected three comma-separated numbers (R,G,B), got '1,2'"),
    ("a,b,c", "expected three comma-separated numbers, got 'a,b,c'"),
])
def test_bad_mean_is_a_usage_error(image_folder: Path, value: str, why: str) -> None:
    assert _usage_error(_extract(image_folder, "--mean", value)) == f"Error: Invalid value for '--mean': {why}"
    assert not Path("features").exists()


def test_bad_choice_is_a_usage_error(image_folder: Path) -> None:
    last = _usage_error(_extract(image_folder, "--split", "dev"))
    assert last.startswith("Error: Invalid value for '--split': 'dev' is not one of 'train', 'val', 'test'")


# ---------------------------------------------------------------- layers, info, models


def _columns(out: str, module: str) -> list[str]:
    lines = [line for line in out.splitlines() if line.split()[:1] == [module]]
    assert len(lines) == 1, out
    return lines[0].split()


def test_layers_lists_shapes_and_marks_the_default_tap() -> None:
    out = _ok(_run("layers", "resnet18", "--image-size", "64"))
    assert out.splitlines()[0].split() == ["module", "type", "input", "output"]
    assert _columns(out, "avgpool") == ["avgpool", "AdaptiveAvgPool2d", "512x2x2", "512x1x1", "<-", "default", "tap", "(output)"]
    assert _columns(out, "fc") == ["fc", "Linear", "512", "1000"]
    assert _columns(out, "layer4.1") == ["layer4.1", "BasicBlock", "512x2x2", "512x2x2"]
    assert out.count("default tap") == 1
    assert "layer4.1.conv1" not in out
    assert _columns(_ok(_run("layers", "resnet18", "--image-size", "64", "--all")), "layer4.1.conv1") == [
        "layer4.1.conv1", "Conv2d", "512x2x2", "512x2x2",
    ]


def test_layers_default_tap_of_a_model_without_avgpool() -> None:
    out = _ok(_run("layers", "mobilenet_v2", "--image-size", "32"))
    assert _columns(out, "classifier") == ["classifier", "Sequential", "1280", "1000", "<-", "default", "tap", "(input)"]


def test_layers_errors() -> None:
    assert _error(_run("layers", "resnet5")).startswith("unknown model 'resnet5'; did you mean resnet50")
    assert _usage_error(_run("layers", "resnet18", "--image-size", "4")).startswith("Error: Invalid value for '--image-size': 4 is not in the range x>=8")


def test_info_describes_a_cache(image_folder: Path) -> None:
    _ok(_extract(image_folder, "--split", "test"))
    out = _ok(_run("info", str(TEST_CACHE)))
    lines = [" ".join(line.split()) for line in out.splitlines()]
    assert lines[0].startswith(f"{TEST_CACHE} (") and lines[0].endswith(" MiB, complete)")
    assert "dataset ds split test (9 images, 0 skipped)" in lines
    assert "model mobilenet_v2 weights none" in lines
    assert any(line.startswith("tap classifier:input 9 x 1280 float32 chunks") for line in lines), out
    assert "classes 3: ant, bee, cat" in lines
    assert "preprocess resize 36, crop 32, mean [0.485, 0.456, 0.406], std [0.229, 0.224, 0.225], bilinear" in lines


def test_info_on_a_missing_file() -> None:
    assert _error(_run("info", "missing.h5")) == "no feature cache at missing.h5; run pipeline extract first"


def test_models_lists_torchvision_classifiers() -> None:
    names = _ok(_run("models")).split()
    assert {"resnet50", "mobilenet_v2", "resnet18"} <= set(names)
    assert names == sorted(names) and len(names) == len(set(names))


# ---------------------------------------------------------------- pipeline.toml


def _toml(path: Path, data: Path, extra: str = "") -> None:
    path.write_text(
        "[extract]\n"
        f'data = "{data}"\nsplit = "test"\nweights = "none"\ncrop = 32\nresize = 36\nworkers = 0\n'
        f'batch_size = 4\ndevice = "cpu"\nengine = "eager"\n{extra}'
    )


def test_pipeline_toml_supplies_settings_and_options_override_them(image_folder: Path) -> None:
    _toml(Path("pipeline.toml"), image_folder, 'layers = ["features.18", "classifier:input"]\n')
    out = _ok(_run("extract", "--no-progress"))
    path = Path("features/ds/mobilenet_v2-none/features.18-output+classifier-input/test.h5")
    assert out.startswith(f"test: {path}  9 images, 0 skipped, ")
    with read_cache(path) as c:
        assert c.taps == ["features.18:output", "classifier:input"]
        assert c.attrs["preprocess"]["crop"] == 32 and c.attrs["preprocess"]["resize"] == 36 and c.attrs["weights"] == "none"
    # An option beats the file; the file's other settings stay.
    out = _ok(_run("extract", "--no-progress", "--crop", "28", "--cache-dir", "other"))
    other = Path("other") / path.relative_to("features")
    assert out.startswith(f"test: {other}  9 images")
    with read_cache(other) as c:
        assert c.attrs["preprocess"]["crop"] == 28 and c.attrs["preprocess"]["resize"] == 36
        assert c.taps == ["features.18:output", "classifier:input"]


def test_config_option_reads_another_file(image_folder: Path) -> None:
    Path("conf").mkdir()
    _toml(Path("conf/custom.toml"), image_folder)
    out = _ok(_run("extract", "--no-progress", "--config", "conf/custom.toml"))
    assert out.startswith(f"test: {TEST_CACHE}  9 images")
    assert _error(_run("extract", "--config", "nope.toml")) == "config file nope.toml not found"


def test_unknown_key_in_pipeline_toml(image_folder: Path) -> None:
    _toml(Path("pipeline.toml"), image_folder, "bogus = 1\n")
    valid = ", ".join(sorted(f.name for f in dataclasses.fields(ExtractConfig)))
    assert _error(_run("extract", "--no-progress")) == f"[extract] in pipeline.toml: unknown setting(s) ['bogus']; valid: {valid}"


def test_malformed_pipeline_toml(tmp_path: Path) -> None:
    Path("pipeline.toml").write_text('weights = "none"\n')
    msg = _error(_run("extract"))
    assert msg == f"{tmp_path / 'pipeline.toml'}: settings must sit in sections such as [extract]; found top-level ['weights']"
    Path("pipeline.toml").write_text("[extract\n")
    assert _error(_run("extract")).startswith(f"{tmp_path / 'pipeline.toml'}: ")


def test_unknown_key_names_the_file_given_with_config(image_folder: Path) -> None:
    _toml(Path("custom.toml"), image_folder, "bogus = 1\n")
    assert _error(_run("extract", "--config", "custom.toml")).startswith("[extract] in custom.toml: unknown setting(s) ['bogus']")


def test_output_from_pipeline_toml_with_two_splits_is_a_usage_error(image_folder: Path) -> None:
    _toml(Path("pipeline.toml"), image_folder, 'output = "one.h5"\n')
    result = _run("extract", "--no-progress", "--split", "train", "--split", "test")
    assert _usage_error(result) == "Error: Invalid value for --output: --output takes one --split"
    assert not Path("one.h5").exists()
