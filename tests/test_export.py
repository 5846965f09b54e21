"""Export: every head family's graph against scikit-learn, the whole exported model against pipeline predict, its
contract and metadata, predict --model and the README's snippet without torch or scikit-learn, and the refusals.

The end-to-end tests run a tiny real extraction (random-weight MobileNetV2 at 32 px) of generated images.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner, Result
from PIL import Image
from sklearn.linear_model import SGDClassifier
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from pipeline.artifacts import load_head, save_head
from pipeline.cli import cli
from pipeline.export import export
from pipeline.finetune import FinetuneConfig, finetune
from pipeline.fit import HeadConfig, fit_head
from pipeline.heads import HEADS, build_head, head_probabilities
from pipeline.images import resize_crop
from pipeline.onnx_heads import FEATURES, head_model
from pipeline.onnx_model import METADATA, load_onnx_model, predict_onnx
from pipeline.predict import predict

from .conftest import CLASSES, extracted, make_image_folder, single_threaded, working_in

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"linear": 1e-3, "logreg": 1.0, "svm": 0.1, "svm-rbf": 1.0, "tree": 10, "extra-trees": 10, "hgb": 20, "knn": 3}
LINEAR_FAMILY = ("linear", "logreg", "svm", "svm-rbf")


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with single_threaded():
        yield


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------- each head family's graph, on synthetic features


def _blobs(k: int, d: int = 16, n: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(k), n)
    X = rng.normal(size=(len(y), d)).astype(np.float32)
    X[:, :k] += 2 * np.eye(k, dtype=np.float32)[y]
    return X, y, rng.normal(size=(100, d)).astype(np.float32)  # new rows: none is a training row


def _sgd(loss: str) -> object:
    """The streamed heads' estimator (stream.fit_streaming): SGD with log or hinge loss."""
    pipe = build_head("logreg", 1.0, pca=8)
    pipe.steps[-1] = ("clf", SGDClassifier(loss=loss, random_state=0))
    return pipe


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("name", [*HEADS, "sgd-log", "sgd-hinge"])
def test_each_head_graph_gives_the_probabilities_predict_gives(name: str, k: int) -> None:
    X, y, new = _blobs(k)
    pipe = _sgd(name[4:].replace("log", "log_loss")) if name.startswith("sgd") else build_head(name, SMALL[name], pca=8)
    pipe.fit(X, y)
    session = _session(head_model(pipe, (16,), k))
    for rows in (X, new):
        probabilities, label = session.run(["probabilities", "label"], {FEATURES: rows})
        expected = head_probabilities(pipe, rows)
        assert probabilities.dtype == np.float32 and label.dtype == np.int64 and probabilities.shape == (len(rows), k)
        np.testing.assert_allclose(probabilities, expected, atol=1e-5)
        assert np.array_equal(label, expected.argmax(axis=1))


@pytest.mark.parametrize("pool", ["avg", "max", "flatten"])
def test_spatial_features_are_pooled_in_the_graph(pool: str) -> None:
    X, y, new = _blobs(3, d=32)
    X, new = X.reshape(-1, 8, 2, 2), new.reshape(-1, 8, 2, 2)
    pipe = build_head("logreg", 1.0, pool=pool).fit(X, y)
    probabilities, _ = _session(head_model(pipe, (8, 2, 2), 3)).run(None, {FEATURES: new})
    np.testing.assert_allclose(probabilities, head_probabilities(pipe, new), atol=1e-5)


def test_probabilities_of_heads_without_predict_proba_are_the_softmax_of_decision_values() -> None:
    X, y, new = _blobs(3)
    pipe = build_head("svm", 0.1, pca=8).fit(X, y)
    d = pipe.decision_function(new)
    np.testing.assert_allclose(head_probabilities(pipe, new), np.exp(d) / np.exp(d).sum(1, keepdims=True), rtol=1e-6)
    np.testing.assert_allclose(head_probabilities(pipe, new, 2.0), np.exp(d / 2) / np.exp(d / 2).sum(1, keepdims=True), rtol=1e-6)
    pipe = build_head("svm-rbf", 1.0, pca=8).fit(X[y < 2], y[y < 2])
    d = pipe.decision_function(new)  # one value, positive for the second class: p = softmax([0, d])
    np.testing.assert_allclose(head_probabilities(pipe, new)[:, 1], 1 / (1 + np.exp(-d)), rtol=1e-6)
    np.testing.assert_allclose(head_probabilities(pipe, new, 0.5)[:, 1], 1 / (1 + np.exp(-2 * d)), rtol=1e-6)


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("name", ["svm", "svm-rbf", "sgd-hinge"])
def test_a_head_graph_divides_decision_values_by_the_heads_temperature(name: str, k: int) -> None:
    X, y, new = _blobs(k)
    pipe = _sgd("hinge") if name == "sgd-hinge" else build_head(name, SMALL[name], pca=8)
    pipe.fit(X, y)
    probabilities, _ = _session(head_model(pipe, (16,), k, temperature=0.3)).run(None, {FEATURES: new})
    expected = head_probabilities(pipe, new, 0.3)
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    assert np.abs(expected - head_probabilities(pipe, new)).max() > 0.05  # the temperature changed them


def test_a_head_skl2onnx_cannot_convert_is_refused_by_name() -> None:
    X, y, _ = _blobs(3)
    pipe = build_head("knn", 3, pca=8)
    pipe.steps[-1][1].set_params(metric="manhattan")
    pipe.fit(X, y)
    with pytest.raises(ValueError, match=r"cannot convert the head's KNeighborsClassifier .*only Euclidean kNN"):
        head_model(pipe, (16,), 3)


# ---------------------------------------------------------------- the whole model, through a real backbone


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A tiny real extraction (random-weight MobileNetV2 at 32 px) of train, val (carved) and test, and new images
    of other sizes, so that the resize and the crop both have work to do."""
    root = tmp_path_factory.mktemp("export")
    with working_in(root):
        data, source = extracted(root, {"train": 10, "test": 3})
        tall = make_image_folder(root / "new", {"tall": 2}, size=(57, 41), seed=7) / "tall"
        wide = make_image_folder(root / "new", {"wide": 2}, size=(37, 70), seed=8) / "wide"
    return SimpleNamespace(root=root, data=data, source=source, images=[data / "test", tall, wide], heads={})


def _head(real: SimpleNamespace, name: str) -> Path:
    """A head of family ``name`` fitted on the real caches (once per module)."""
    if name not in real.heads:
        # The random backbone's features are nearly parallel: after kNN's default L2 normalisation PCA is left with
        # float32 rounding noise, in scikit-learn and in the graph alike. Standardised, they keep their differences.
        preprocessing = "standardize" if name == "knn" else None
        config = HeadConfig(clf=name, grid=(SMALL[name],), refine=0, preprocessing=preprocessing)
        real.heads[name] = fit_head(config, real.source, out=real.root / "heads" / name).path
    return real.heads[name]


def _parity(real: SimpleNamespace, head: Path, model: Path) -> tuple[float, float]:
    """(share of equal labels, largest probability difference) between pipeline predict and the exported model."""
    expected, classes = predict(head, real.images)
    got, got_classes = predict_onnx(model, real.images)
    assert got_classes == classes == list(CLASSES) and [r["path"] for r in got] == [r["path"] for r in expected] and len(got) == 21
    same = np.mean([g["label"] == e["label"] for g, e in zip(got, expected)])
    p = lambda rows: np.array([[r["probabilities"][c] for c in classes] for r in rows])  # noqa: E731
    return float(same), float(np.abs(p(got) - p(expected)).max())


@pytest.mark.parametrize("name", [
    "linear", "svm", "tree", "knn",
    *(pytest.param(n, marks=pytest.mark.slow) for n in ("logreg", "svm-rbf", "extra-trees", "hgb")),
])
def test_the_exported_model_predicts_what_pipeline_predict_does(real: SimpleNamespace, name: str) -> None:
    head = _head(real, name)
    model = export(head, real.root / f"{name}.onnx")
    same, diff = _parity(real, head, model)
    if name in LINEAR_FAMILY:
        assert same == 1.0 and diff <= 1e-4, (same, diff)
    else:
        assert same >= 0.995, (same, diff)


def test_the_contract_and_the_metadata(real: SimpleNamespace) -> None:
    head = _head(real, "svm")
    model = export(head)
    assert model == head.with_suffix(".onnx")  # layout.export_path: beside the head
    graph = onnx.load(model)
    onnx.checker.check_model(graph)
    [images] = graph.graph.input
    dims = [d.dim_param or d.dim_value for d in images.type.tensor_type.shape.dim]
    assert images.name == "images" and images.type.tensor_type.elem_type == onnx.TensorProto.UINT8 and dims[1:] == [32, 32, 3]
    outputs = {o.name: o.type.tensor_type.elem_type for o in graph.graph.output}
    assert outputs == {"probabilities": onnx.TensorProto.FLOAT, "label": onnx.TensorProto.INT64}
    meta = {p.key: p.value for p in graph.metadata_props}
    assert set(meta) == set(METADATA)
    head_meta = json.loads(head.read_text())
    artifact = head.with_name(head_meta["artifact"])
    assert meta["head_sha256"] == hashlib.sha256(artifact.read_bytes()).hexdigest() == head_meta["artifact_sha256"]
    assert json.loads(meta["classes"]) == list(CLASSES) and meta["head"] == "svm" and meta["head_file"] == artifact.name
    assert (meta["model"], meta["weights"], meta["tap"]) == ("mobilenet_v2", "none", "classifier:input")
    assert (meta["resize"], meta["crop"], meta["interpolation"]) == ("36", "32", "bilinear")
    assert meta["probabilities"].startswith("softmax of the decision values") and meta["format"] == "pipeline-onnx"
    assert f"over the temperature {head_meta['temperature']:.6g}" in meta["probabilities"]  # the one fitted on val
    assert json.loads(meta["mean"]) == pytest.approx([0.485, 0.456, 0.406])
    # Normalisation is in the graph: raw uint8 pixels of any batch size go in.
    m = load_onnx_model(model)
    batch = np.stack([m.image(p) for p in sorted((real.data / "test" / "ant").iterdir())])
    probabilities, label = m(batch)
    assert probabilities.shape == (3, 3) and np.allclose(probabilities.sum(1), 1, atol=1e-5) and np.array_equal(label, probabilities.argmax(1))


def test_resize_crop_is_torchvisions_resize_and_centre_crop_pixel_for_pixel() -> None:
    rng = np.random.default_rng(0)
    for w, h in [(36, 44), (44, 36), (41, 57), (70, 37), (33, 33), (32, 100)]:
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for mode in ("bilinear", "bicubic", "nearest"):
            reference = T.Compose([T.Resize(36, interpolation=InterpolationMode(mode)), T.CenterCrop(32), T.PILToTensor()])(image)
            assert np.array_equal(resize_crop(image, 36, 32, mode), reference.permute(1, 2, 0).numpy()), (w, h, mode)


def test_a_fine_tuned_model_exports_too(real: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(real.root)
    config = FinetuneConfig(data=str(real.data), model="mobilenet_v2", weights="none", crop=32, resize=36, batch_size=8, epochs=1,
                            workers=0, device="cpu", optimizer="adamw", lr=1e-3, name="ft")
    run = finetune(config, progress=False, log=lambda line: None).path
    model = export(run)
    assert model == run.with_name("model.onnx")
    meta = load_onnx_model(model).metadata
    assert meta["head"] == "finetune" and meta["tap"] == "classifier.1:output" and meta["probabilities"] == "softmax of the logits"
    same, diff = _parity(real, run, model)
    assert same == 1.0 and diff <= 1e-4, (same, diff)


# ---------------------------------------------------------------- the command line, and running without torch


def _run(*args: object) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


def _ok(result: Result) -> str:
    assert result.exit_code == 0, result.output
    return result.output


def _error(result: Result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, result.output
    return result.output.strip().removeprefix("Error: ")


def test_export_and_predict_model_commands(real: SimpleNamespace, tmp_path: Path) -> None:
    head = _head(real, "linear")
    out = _ok(_run("export", head, "-o", tmp_path / "m.onnx"))
    assert re.fullmatch(rf"{re.escape(str(head))} -> {re.escape(str(tmp_path / 'm.onnx'))} \(\d+\.\d MiB\); run it with: "
                        rf"pipeline predict --model \S+ IMAGES\.\.\.\n", out)
    assert _ok(_run("predict", *real.images, "--model", tmp_path / "m.onnx", "-o", "onnx.csv")).strip().splitlines()[-1] == "21 images predicted, 0 skipped -> onnx.csv"
    _ok(_run("predict", *real.images, "--head", head, "-o", "head.csv"))
    onnx_rows, head_rows = Path("onnx.csv").read_text().splitlines(), Path("head.csv").read_text().splitlines()
    assert onnx_rows[0] == head_rows[0] == "path,label,score,error,p_ant,p_bee,p_cat"
    assert [r.split(",")[:2] for r in onnx_rows] == [r.split(",")[:2] for r in head_rows]

    assert _error(_run("export", "nowhere.json")) == "no head metadata at nowhere.json; fit a head with pipeline fit-head first"
    assert _error(_run("export", head, "-o", head)) == f"the exported model is an .onnx file; got {head}"
    assert _error(_run("predict", real.data, "--model", "nowhere.onnx")).startswith("no exported model at nowhere.onnx")
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None])
    foreign = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g", [x], [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None])])
    Path("foreign.onnx").write_bytes(onnx.helper.make_model(foreign).SerializeToString())
    assert "not one written by pipeline export" in _error(_run("predict", real.data, "--model", "foreign.onnx"))
    Path("garbage.onnx").write_bytes(b"not a protobuf")
    assert _error(_run("predict", real.data, "--model", "garbage.onnx")).startswith("garbage.onnx is not a readable ONNX model (")
    assert "give either --head" in _run("predict", real.data).output
    assert "give either --head" in _run("predict", real.data, "--head", head, "--model", "m.onnx").output


def test_a_failed_export_leaves_no_file(real: SimpleNamespace, tmp_path: Path) -> None:
    art = load_head(_head(real, "knn"))
    knn = art.pipeline.steps[-1][1]
    knn.metric = knn.effective_metric_ = "manhattan"  # a kNN the graph cannot express
    head = save_head(art.pipeline, {k: v for k, v in art.meta.items() if not k.startswith(("artifact", "format"))}, tmp_path / "odd")
    with pytest.raises(ValueError, match=r"odd\.json: the knn head cannot be exported: .*only Euclidean kNN"):
        export(head, tmp_path / "odd.onnx")
    artifact = json.loads(head.read_text())["artifact"]  # content-named: odd.<digest>.skops
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["odd.json", artifact]) and artifact.endswith(".skops")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


_LOADED = "import sys; print('LOADED', sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'torchvision', 'sklearn', 'skl2onnx'}))"


def test_predict_model_runs_without_torch_or_scikit_learn(real: SimpleNamespace, tmp_path: Path) -> None:
    model = export(_head(real, "linear"), tmp_path / "m.onnx")
    code = f"from pipeline.cli import cli\ntry:\n    cli({['predict', '--model', str(model), str(real.images[1]), '-o', str(tmp_path / 'p.csv')]!r})\nexcept SystemExit:\n    pass\n{_LOADED}"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-2:] == [f"6 images predicted, 0 skipped -> {tmp_path / 'p.csv'}", "LOADED []"]


def _readme_snippet() -> str:
    text = (ROOT / "README.md").read_text()
    found = re.search(r"<!-- tested by tests/test_export.py -->\n```python\n(.*?)```", text, re.S)
    assert found, "README.md has no snippet marked as tested"
    return found.group(1)


def test_the_readme_snippet_runs_with_onnxruntime_numpy_and_pil_alone(real: SimpleNamespace, tmp_path: Path) -> None:
    snippet = _readme_snippet()
    assert len(snippet.strip().splitlines()) <= 16
    export(_head(real, "svm"), tmp_path / "model.onnx")
    images = sorted(str(p) for folder in real.images for p in folder.rglob("*.png"))
    done = subprocess.run([sys.executable, "-c", snippet + _LOADED, *images], capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=120)
    assert done.returncode == 0, done.stderr
    *lines, loaded = done.stdout.splitlines()
    assert loaded == "LOADED []"
    rows, _ = predict_onnx(tmp_path / "model.onnx", images)
    assert [line.split()[:2] for line in lines] == [[r["path"], r["label"]] for r in rows]
    assert [float(line.split()[2]) for line in lines] == pytest.approx([r["score"] for r in rows], abs=1e-3)
