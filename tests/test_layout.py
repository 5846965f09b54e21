"""The disk layout and the reuse contract: one owner each, asked by every stage."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline import layout, provenance


def test_the_layout_of_a_cache_its_heads_and_their_evaluations():
    cache = layout.cache_path("features", "my photos", "resnet50", "IMAGENET1K_V2", ["avgpool:output"], "train")
    assert cache == Path("features/my-photos/resnet50-IMAGENET1K_V2/avgpool-output/train.h5")
    assert layout.partial_dir(cache) == cache.with_name("train.h5.partial")
    assert layout.sibling_cache(cache, "test") == cache.with_name("test.h5")
    base = layout.head_base(cache, "svm")
    assert base == cache.parent / "heads" / "svm"
    assert layout.head_base(cache, "svm", subset=100) == cache.parent / "heads" / "subset-100" / "svm"
    assert layout.head_base(cache, "svm", exclude=50) == cache.parent / "heads" / "exclude-50" / "svm"
    audit = layout.audit_files(layout.audit_dir(cache))
    assert audit.dir == cache.parent / "audit"
    assert [p.name for p in (audit.label_issues, audit.duplicates, audit.outliers, audit.summary)] == [
        "label_issues.csv", "duplicates.csv", "outliers.csv", "summary.json"]
    files = layout.head_files(base.with_suffix(".json"))
    assert (files.meta.name, files.torch.name, files.history.name) == ("svm.json", "svm.pt", "svm-history.csv")
    ev = layout.evaluation_files(files.meta)
    assert (ev.metrics.name, ev.predictions.name, ev.confusion.name) == ("svm-test.json", "svm-test-predictions.npz", "svm-confusion.png")
    assert layout.export_path(files.meta) == layout.export_path(files.skops) == base.with_suffix(".onnx")


def test_head_metadata_leaves_out_evaluations_and_subset_folders_are_found(tmp_path):
    for name in ("svm.json", "svm-test.json", "linear.json"):
        (tmp_path / name).write_text("{}")
    for n in (100, 20):
        (tmp_path / f"subset-{n}").mkdir()
    (tmp_path / "subset-x").mkdir()
    assert [p.name for p in layout.head_metadata(tmp_path)] == ["linear.json", "svm.json"]
    assert [n for n, _ in layout.subset_head_dirs(tmp_path)] == [20, 100]
    (tmp_path / "exclude-7").mkdir()
    assert [n for n, _ in layout.exclude_head_dirs(tmp_path)] == [7] and len(layout.subset_head_dirs(tmp_path)) == 2


def test_runs_and_reports(tmp_path):
    run = layout.run_dir(tmp_path, "ds", "resnet18", "none", "lp-ft")
    assert run == tmp_path / "ds" / "resnet18-none" / "lp-ft"
    files = layout.run_files(run)
    assert [p.name for p in (files.meta, files.model, files.last, files.history)] == ["model.json", "model.pt", "last.pt", "history.csv"]
    assert layout.export_path(files.meta) == run / "model.onnx"
    other = layout.run_dir(tmp_path, "ds", "resnet50", "none", "x")
    for folder in (run, other):
        folder.mkdir(parents=True)
        (folder / "model.json").write_text("{}")
    assert layout.run_metadata(tmp_path, "ds", "resnet18", "none") == [files.meta]
    report = layout.report_files(layout.report_dir(tmp_path, "ds", "resnet18", "none"))
    assert report.html == tmp_path / "ds" / "resnet18-none" / "index.html" and report.data.name == "report.json"


def test_a_record_is_current_only_for_the_same_inputs_and_with_its_files(tmp_path):
    inputs = {"config": {"grid": (1, 2), "path": Path("a")}, "rows": 3}
    record = {"x": 1, **provenance.stamp(inputs)}
    assert set(record) >= {"inputs", "versions", "created"} and record["versions"]["pipeline"] == provenance.PIPELINE_VERSION
    path = tmp_path / "a.json"
    path.write_text(json.dumps(record))
    needed = tmp_path / "payload"
    assert provenance.current_record(path, inputs) == record  # tuples and paths compare as they read back from JSON
    assert provenance.current_record(path, {**inputs, "rows": 4}) is None
    assert provenance.current_record(path, inputs, needed) is None
    needed.write_bytes(b"")
    assert provenance.current_record(path, inputs, needed) == record
    path.write_text("{not json")
    assert provenance.current_record(path, inputs) is None


def test_settings_differences_are_readable():
    assert provenance.diff({"preprocess": {"crop": 224}, "model": "a"}, {"preprocess": {"crop": 160}, "model": "a"}) == ["preprocess.crop: 224 -> 160"]


def test_a_head_artifact_is_named_by_its_content_and_leads_back_to_its_head(tmp_path):
    files = layout.head_files(tmp_path / "svm.json")
    digest = "0123456789abcdef" * 4
    artifact = files.artifact(".skops", digest)
    assert artifact.name == "svm.0123456789abcdef.skops"
    assert layout.head_files(artifact) == files and layout.evaluation_files(artifact).metrics.name == "svm-test.json"
    for name in (artifact.name, "svm.pt", "svm.joblib", "svm.fedcba9876543210.pt", "svm.json", "svm-history.csv", "svm2.pt", ".svm.pt.1.0a0b0c0d.tmp"):
        (tmp_path / name).write_text("")
    assert [p.name for p in files.artifacts()] == ["svm.0123456789abcdef.skops", "svm.fedcba9876543210.pt", "svm.joblib", "svm.pt"]
    assert layout.lock_file(files.meta) == tmp_path / ".svm.json.lock"
    assert layout.lock_file(tmp_path / "runs" / "lp-ft") == tmp_path / "runs" / ".lp-ft.lock"


def test_a_head_base_with_a_dot_in_its_name_keeps_it(tmp_path):
    # fit-head -o heads/features.16-output: the part after the dot is the name's, not a suffix to replace.
    files = layout.head_files(tmp_path / "features.16-output")
    assert files.meta.name == "features.16-output.json" and layout.head_files(files.meta) == files
    assert layout.head_files(files.artifact(".pt", "ab" * 32)) == files
