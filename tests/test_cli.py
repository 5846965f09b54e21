"""The command line: help for every command, extract's output, one-line errors, layers/info/models, pipeline.toml."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import Result

from pipeline import ExtractConfig, read_cache
from pipeline.cli import cli

from .helpers import child_env, error, invoke, ok, usage_error

# What tiny() sets, as options: random-weight MobileNetV2 at 32 px on the CPU, no workers.
TINY = ["--weights", "none", "--crop", "32", "--resize", "36", "--batch-size", "4", "--workers", "0",
        "--engine", "eager", "--device", "cpu", "--no-progress"]
TEST_CACHE = Path("features/ds/mobilenet_v2-none/classifier-input/test.h5")


def _extract(data: Path, *args: str) -> Result:
    return invoke("extract", "--data", str(data), *TINY, *args)


# ---------------------------------------------------------------- help


def test_group_help_lists_every_command() -> None:
    out = ok(invoke("--help"))
    assert out.startswith("Usage: cli [OPTIONS] COMMAND [ARGS]...")
    for name in cli.commands:
        assert re.search(rf"^  {name} ", out, re.M), name
    assert ok(invoke("-h")) == out


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_every_command_has_help(name: str) -> None:
    out = ok(invoke(name, "--help"))
    assert out.startswith(f"Usage: cli {name} [OPTIONS]")
    first_words = " ".join(cli.commands[name].help.split()[:4])
    assert first_words in " ".join(out.split())
    assert "-h, --help" in out


# Run in a fresh interpreter: whether torch is imported can only be seen in a process that has not imported it yet.
_FRESH = """
import contextlib, io, json, sys
import pipeline.cli
HEAVY = ("torch", "sklearn", "h5py")
on_import = [m for m in HEAVY if m in sys.modules]
out = io.StringIO()
with contextlib.redirect_stdout(out):
    pipeline.cli.cli(["--help"], prog_name="pipeline", standalone_mode=False)
print(json.dumps({"on_import": on_import, "after_help": [m for m in HEAVY if m in sys.modules], "help": out.getvalue()}))
"""


def _fresh_python(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=child_env(), timeout=120)


def test_importing_the_cli_and_its_help_import_no_heavy_library() -> None:
    run = _fresh_python("-c", _FRESH)
    assert run.returncode == 0, run.stderr
    seen = json.loads(run.stdout)
    assert seen["on_import"] == [], f"import pipeline.cli imported {seen['on_import']}; import them inside the commands"
    assert seen["after_help"] == [], f"pipeline --help imported {seen['after_help']}"
    for name in cli.commands:
        assert re.search(rf"^  {name} ", seen["help"], re.M), name


def test_pipeline_help_in_a_fresh_process_lists_every_command() -> None:
    run = _fresh_python("-m", "pipeline", "--help")
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("Usage: ") and "[OPTIONS] COMMAND [ARGS]..." in run.stdout.splitlines()[0]
    for name in cli.commands:
        assert re.search(rf"^  {name} ", run.stdout, re.M), name


def test_info_on_a_cache_imports_no_torch(tmp_path: Path) -> None:
    from pipeline.cache import write_features

    cache = write_features(tmp_path / "train.h5", np.ones((3, 4), np.float32), np.array([0, 1, 0]), ["a", "b"],
                           {"model": "m", "weights": "w", "taps": ["t"], "preprocess": {}})
    script = ("import sys, pipeline.cli\n"
              f"pipeline.cli.cli(['info', {str(cache)!r}], prog_name='pipeline', standalone_mode=False)\n"
              "print('torch' in sys.modules, 'sklearn' in sys.modules)")
    run = _fresh_python("-c", script)
    assert run.returncode == 0, run.stderr
    assert "3 images" in run.stdout and run.stdout.splitlines()[-1] == "False False"


_HUB = """
import json, os, sys
from pipeline.assets import hub_dir
envs = [{}, {"TORCH_HOME": "/opt/th"}, {"XDG_CACHE_HOME": "/var/xdg"}, {"TORCH_HOME": "~/th", "XDG_CACHE_HOME": "/x"}]
def use(env):
    for k in ("TORCH_HOME", "XDG_CACHE_HOME"):
        os.environ.pop(k, None)
    os.environ.update(env)
mine = []
for env in envs:
    use(env)
    mine.append(str(hub_dir()))
loaded = "torch" in sys.modules
import torch
theirs = []
for env in envs:
    use(env)
    theirs.append(torch.hub.get_dir())
print(json.dumps({"loaded": loaded, "mine": mine, "theirs": theirs}))
"""


def test_the_weights_folder_is_found_as_torch_finds_it_without_importing_torch() -> None:
    run = _fresh_python("-c", _HUB)
    assert run.returncode == 0, run.stderr
    seen = json.loads(run.stdout)
    assert not seen["loaded"] and seen["mine"] == seen["theirs"] and len(set(seen["mine"])) == 4


def test_the_head_registry_and_the_cli_choices_name_the_same_heads() -> None:
    import pipeline.config
    import pipeline.heads

    assert tuple(pipeline.heads.HEADS) == pipeline.config.HEAD_NAMES


def test_version() -> None:
    assert re.fullmatch(r"cli, version \d+\.\d+\.\d+\n", ok(invoke("--version")))


# ---------------------------------------------------------------- extract: success


def test_extract_prints_the_cache_then_up_to_date(image_folder: Path) -> None:
    out = ok(_extract(image_folder, "--split", "test"))
    assert re.fullmatch(rf"test: {re.escape(str(TEST_CACHE))}  9 images, 0 skipped, \d+\.\d img/s \(eager\)\n", out)
    with read_cache(TEST_CACHE) as c:
        assert len(c) == 9 and c.attrs["preprocess"]["crop"] == 32 and c.attrs["weights"] == "none"
    again = ok(_extract(image_folder, "--split", "test"))
    assert again == f"test: {TEST_CACHE} is up to date (9 images); nothing to do\n"


def test_extract_two_splits(image_folder: Path) -> None:
    out = ok(_extract(image_folder, "--split", "train", "--split", "test"))
    lines = out.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"train: {TEST_CACHE.with_name('train.h5')}  27 images, 0 skipped, ")
    assert lines[1].startswith(f"test: {TEST_CACHE}  9 images, 0 skipped, ")
    with read_cache(TEST_CACHE.with_name("train.h5")) as c:
        assert len(c) == 27  # 30 minus the carved val
    with read_cache(TEST_CACHE) as c:
        assert len(c) == 9


def test_run_does_several_commands_in_one_process_and_each_artifact_records_its_command(image_folder: Path) -> None:
    extract_args = " ".join(["extract", "--data", str(image_folder), *TINY, "--split", "train", "--split", "val"])
    fit_args = f"fit-head --data {image_folder} --weights none --clf logreg --grid 1"
    out = ok(invoke("run", extract_args, fit_args))
    assert out.startswith(f"$ pipeline {extract_args}\ntrain: ")
    assert f"\n$ pipeline {fit_args}\n" in out
    assert re.search(r"time per command:\n  extract +\d+\.\d s  --data .*\n  fit-head +\d+\.\d s  --data .*\n  total +\d+\.\d s\n$", out), out
    with read_cache(TEST_CACHE.with_name("train.h5")) as c:
        assert c.attrs["command"] == f"pipeline {extract_args}"
    head = json.loads(TEST_CACHE.with_name("heads").joinpath("logreg.json").read_text())
    assert head["command"] == f"pipeline {fit_args}"
    from pipeline import extract

    extract(ExtractConfig(data=str(image_folder), split="test", cache_dir="py", weights="none", crop=32, resize=36, engine="eager", workers=0, device="cpu"), progress=False)
    with read_cache(next(Path("py").rglob("test.h5"))) as c:
        assert "command" not in c.attrs  # called from Python: no command line to record


def test_run_checks_every_command_first_and_stops_at_the_first_that_fails(image_folder: Path) -> None:
    result = invoke("run", "compare", "extrac --split test")
    assert result.exit_code == 2 and "'extrac --split test' is not a pipeline command (one of: assets, audit," in result.output
    assert "$ pipeline" not in result.output  # nothing ran
    result = invoke("run", f"fit-head --data {image_folder} --weights none --clf logreg", "compare")
    assert result.exit_code == 1 and "Error: " in result.output and "$ pipeline compare" not in result.output
    assert re.search(r"\n  total +\d+\.\d s; stopped: 'fit-head --data .*' failed\n$", result.output), result.output


def test_output_writes_one_split_there_and_refuses_two(image_folder: Path) -> None:
    out = ok(_extract(image_folder, "--split", "test", "--output", "one.h5"))
    assert out.startswith("test: one.h5  9 images, 0 skipped, ")
    with read_cache("one.h5") as c:
        assert len(c) == 9
    result = _extract(image_folder, "--split", "train", "--split", "test", "-o", "two.h5")
    assert usage_error(result) == "Error: Invalid value for --output: --output takes one --split"
    assert not Path("two.h5").exists()


def test_skipped_files_are_listed(image_folder: Path) -> None:
    (image_folder / "test" / "bee" / "notes.txt").write_text("x")
    (image_folder / "test" / "bee" / "x.png").write_bytes(b"not a png")
    (image_folder / "test" / "cat" / "empty.png").write_bytes(b"")
    out = ok(_extract(image_folder, "--split", "test", "--on-error", "skip"))
    lines = out.splitlines()
    assert lines[0].startswith(f"test: {TEST_CACHE}  9 images, 2 skipped, ")
    assert lines[1:] == ["  ignored 1 file(s) that are not images (hidden, system or other extensions): test/bee/notes.txt",
                         "  skipped test/cat/empty.png: empty file (0 bytes)",
                         f"  skipped test/bee/x.png: cannot decode image (UnidentifiedImageError: cannot identify image file '{image_folder / 'test' / 'bee' / 'x.png'}')"]


# ---------------------------------------------------------------- extract: errors


def test_unknown_model(image_folder: Path) -> None:
    msg = error(_extract(image_folder, "--split", "test", "--model", "resnet5"))
    assert msg.startswith("unknown model 'resnet5'; did you mean resnet50")
    assert msg.endswith("? (pipeline models lists all torchvision classifiers)")
    msg = error(_extract(image_folder, "--split", "test", "--model", "zzzz"))
    assert msg == "unknown model 'zzzz' (pipeline models lists all torchvision classifiers)"


def test_unknown_weights_name(image_folder: Path) -> None:
    msg = error(_extract(image_folder, "--split", "test", "--weights", "IMAGENET9K"))
    assert msg == "unknown weights 'IMAGENET9K' for mobilenet_v2; expected one of DEFAULT, IMAGENET1K_V1, IMAGENET1K_V2, a state_dict file, or 'none'"


def test_missing_weights_file(image_folder: Path) -> None:
    msg = error(_extract(image_folder, "--split", "test", "--weights", "missing/weights.pth"))
    assert msg == "weights file missing/weights.pth not found"


def test_named_weights_unavailable_offline(image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    msg = error(_extract(image_folder, "--split", "test", "--model", "resnet18", "--weights", "IMAGENET1K_V1"))
    checkpoints = tmp_path / "empty-torch-home" / "hub" / "checkpoints"
    assert msg.startswith(f"resnet18 IMAGENET1K_V1 weights are not in {checkpoints} and PIPELINE_OFFLINE is set. ")
    assert f"Provide them by copying the file to {checkpoints / 'resnet18-f37072fd.pth'}" in msg
    assert "or by passing --weights /path/to/state_dict.pth" in msg
    assert msg.endswith("Random weights must be asked for: --weights none.")
    assert not Path("features").exists()


def test_missing_dataset_folder() -> None:
    assert error(_extract(Path("nope"), "--split", "test")) == "dataset folder nope not found"


def test_bad_file_under_the_default_policy(image_folder: Path) -> None:
    (image_folder / "test" / "ant" / "notes.txt").write_text("x")  # not an image: ignored and counted, not fatal
    (image_folder / "test" / ".DS_Store").write_bytes(b"Bud1")
    out = ok(_extract(image_folder, "--split", "test"))
    assert "  ignored 2 file(s) that are not images (hidden, system or other extensions): test/.DS_Store, test/ant/notes.txt" in out
    (image_folder / "test" / "bee" / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    msg = error(_extract(image_folder, "--split", "test", "--force"))
    assert re.fullmatch(
        re.escape(str(image_folder / "test" / "bee" / "x.png")) + r": cannot decode image \(.+\); remove or fix it, or pass --on-error skip", msg
    ), msg


def test_unknown_layer(image_folder: Path) -> None:
    msg = error(_extract(image_folder, "--split", "test", "--layer", "clasifier"))
    assert msg.startswith("MobileNetV2 has no module 'clasifier'; did you mean classifier")
    assert "Top-level modules: features, classifier" in msg
    assert msg.endswith("(`pipeline layers MODEL` lists every tap point)")
    msg = error(_extract(image_folder, "--split", "test", "--layer", "classifier:inside"))
    assert msg == "tap 'classifier:inside': capture must be 'input' or 'output', got 'inside'"


def test_other_settings_need_force(image_folder: Path) -> None:
    ok(_extract(image_folder, "--split", "test"))
    msg = error(_extract(image_folder, "--split", "test", "--dtype", "float16"))
    assert msg == f"{TEST_CACHE} was made with other settings (dtype: 'float32' -> 'float16'); pass --force to overwrite it"
    out = ok(_extract(image_folder, "--split", "test", "--dtype", "float16", "--force"))
    assert out.startswith(f"test: {TEST_CACHE}  9 images")
    with read_cache(TEST_CACHE) as c:
        assert c.attrs["dtype"] == "float16"


@pytest.mark.parametrize(("value", "why"), [
    ("1,2", "expected three comma-separated numbers (R,G,B), got '1,2'"),
    ("a,b,c", "expected three comma-separated numbers, got 'a,b,c'"),
])
def test_bad_mean_is_a_usage_error(image_folder: Path, value: str, why: str) -> None:
    assert usage_error(_extract(image_folder, "--mean", value)) == f"Error: Invalid value for '--mean': {why}"
    assert not Path("features").exists()


def test_bad_choice_is_a_usage_error(image_folder: Path) -> None:
    last = usage_error(_extract(image_folder, "--split", "dev"))
    assert last.startswith("Error: Invalid value for '--split': 'dev' is not one of 'train', 'val', 'test'")


# ---------------------------------------------------------------- layers, info, models


def _columns(out: str, module: str) -> list[str]:
    lines = [line for line in out.splitlines() if line.split()[:1] == [module]]
    assert len(lines) == 1, out
    return lines[0].split()


def test_layers_lists_shapes_and_marks_the_default_tap() -> None:
    out = ok(invoke("layers", "resnet18", "--image-size", "64"))
    assert out.splitlines()[0].split() == ["module", "type", "input", "output"]
    assert _columns(out, "avgpool") == ["avgpool", "AdaptiveAvgPool2d", "512x2x2", "512x1x1", "<-", "default", "tap", "(output)"]
    assert _columns(out, "fc") == ["fc", "Linear", "512", "1000"]
    assert _columns(out, "layer4.1") == ["layer4.1", "BasicBlock", "512x2x2", "512x2x2"]
    assert out.count("default tap") == 1
    assert "layer4.1.conv1" not in out
    assert _columns(ok(invoke("layers", "resnet18", "--image-size", "64", "--all")), "layer4.1.conv1") == [
        "layer4.1.conv1", "Conv2d", "512x2x2", "512x2x2",
    ]


def test_layers_default_tap_of_a_model_without_avgpool() -> None:
    out = ok(invoke("layers", "mobilenet_v2", "--image-size", "32"))
    assert _columns(out, "classifier") == ["classifier", "Sequential", "1280", "1000", "<-", "default", "tap", "(input)"]


def test_layers_errors() -> None:
    assert error(invoke("layers", "resnet5")).startswith("unknown model 'resnet5'; did you mean resnet50")
    assert usage_error(invoke("layers", "resnet18", "--image-size", "4")).startswith("Error: Invalid value for '--image-size': 4 is not in the range x>=8")


def test_info_describes_a_cache(image_folder: Path) -> None:
    ok(_extract(image_folder, "--split", "test"))
    out = ok(invoke("info", str(TEST_CACHE)))
    lines = [" ".join(line.split()) for line in out.splitlines()]
    assert lines[0].startswith(f"{TEST_CACHE} (") and lines[0].endswith(" MiB, complete)")
    assert "dataset ds split test (9 images, 0 skipped)" in lines
    assert "model mobilenet_v2 weights none" in lines
    assert any(line.startswith("tap classifier:input 9 x 1280 float32 chunks") for line in lines), out
    assert "classes 3: ant, bee, cat" in lines
    assert "preprocess resize 36, crop 32, mean [0.485, 0.456, 0.406], std [0.229, 0.224, 0.225], bilinear" in lines


def test_info_on_a_missing_file() -> None:
    assert error(invoke("info", "missing.h5")) == "no feature cache at missing.h5; run pipeline extract first"


def test_models_lists_torchvision_classifiers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    names = [line.split()[0] for line in ok(invoke("models")).splitlines()]
    assert {"resnet50", "mobilenet_v2", "resnet18"} <= set(names)
    assert names == sorted(names) and len(names) == len(set(names))
    assert ok(invoke("models", "--offline")) == ""
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / "resnet18-f37072fd.pth").write_bytes(b"")
    assert ok(invoke("models", "--offline")).split() == ["resnet18", "weights", "here:", "IMAGENET1K_V1"]
    assert "resnet18                     weights here: IMAGENET1K_V1" in ok(invoke("models"))


# ---------------------------------------------------------------- pipeline.toml


def _toml(path: Path, data: Path, extra: str = "") -> None:
    path.write_text(
        "[extract]\n"
        f'data = "{data}"\nsplit = "test"\nweights = "none"\ncrop = 32\nresize = 36\nworkers = 0\n'
        f'batch_size = 4\ndevice = "cpu"\nengine = "eager"\n{extra}'
    )


def test_pipeline_toml_supplies_settings_and_options_override_them(image_folder: Path) -> None:
    _toml(Path("pipeline.toml"), image_folder, 'layers = ["features.18", "classifier:input"]\n')
    out = ok(invoke("extract", "--no-progress"))
    path = Path("features/ds/mobilenet_v2-none/features.18-output+classifier-input/test.h5")
    assert out.startswith(f"test: {path}  9 images, 0 skipped, ")
    with read_cache(path) as c:
        assert c.taps == ["features.18:output", "classifier:input"]
        assert c.attrs["preprocess"]["crop"] == 32 and c.attrs["preprocess"]["resize"] == 36 and c.attrs["weights"] == "none"
    # An option beats the file; the file's other settings stay.
    out = ok(invoke("extract", "--no-progress", "--crop", "28", "--cache-dir", "other"))
    other = Path("other") / path.relative_to("features")
    assert out.startswith(f"test: {other}  9 images")
    with read_cache(other) as c:
        assert c.attrs["preprocess"]["crop"] == 28 and c.attrs["preprocess"]["resize"] == 36
        assert c.taps == ["features.18:output", "classifier:input"]


def test_config_option_reads_another_file(image_folder: Path) -> None:
    Path("conf").mkdir()
    _toml(Path("conf/custom.toml"), image_folder)
    out = ok(invoke("extract", "--no-progress", "--config", "conf/custom.toml"))
    assert out.startswith(f"test: {TEST_CACHE}  9 images")
    assert error(invoke("extract", "--config", "nope.toml")) == "config file nope.toml not found"


def test_unknown_key_in_pipeline_toml(image_folder: Path) -> None:
    _toml(Path("pipeline.toml"), image_folder, "bogus = 1\n")
    valid = ", ".join(sorted(f.name for f in dataclasses.fields(ExtractConfig)))
    assert error(invoke("extract", "--no-progress")) == f"[extract] in pipeline.toml: unknown setting(s) ['bogus']; valid: {valid}"


def test_malformed_pipeline_toml(tmp_path: Path) -> None:
    Path("pipeline.toml").write_text('weights = "none"\n')
    msg = error(invoke("extract"))
    assert msg == f"{tmp_path / 'pipeline.toml'}: settings must sit in sections such as [extract]; found top-level ['weights']"
    Path("pipeline.toml").write_text("[extract\n")
    assert error(invoke("extract")).startswith(f"{tmp_path / 'pipeline.toml'}: ")


def test_unknown_key_names_the_file_given_with_config(image_folder: Path) -> None:
    _toml(Path("custom.toml"), image_folder, "bogus = 1\n")
    assert error(invoke("extract", "--config", "custom.toml")).startswith("[extract] in custom.toml: unknown setting(s) ['bogus']")


def test_output_from_pipeline_toml_with_two_splits_is_a_usage_error(image_folder: Path) -> None:
    _toml(Path("pipeline.toml"), image_folder, 'output = "one.h5"\n')
    result = invoke("extract", "--no-progress", "--split", "train", "--split", "test")
    assert usage_error(result) == "Error: Invalid value for --output: --output takes one --split"
    assert not Path("one.h5").exists()
