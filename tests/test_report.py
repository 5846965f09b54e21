"""The report: what it shows comes from the stages' files, it is reused while they are unchanged, and it renders.

One tiny real run feeds it: random-weight MobileNetV2 at 32 px over generated images, three heads on the whole
train split and on a 3-per-class subset, and a two-epoch fine-tune of that subset.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline import extract, read_cache
from pipeline.cli import cli
from pipeline.evaluate import evaluate, load_predictions
from pipeline.finetune import FinetuneConfig, finetune
from pipeline.fit import HeadConfig, fit_head
from pipeline import layout
from pipeline.report import ReportConfig, RenderError, build_report, check_render, find_chromium

from pipeline.stats import mcnemar, wilson_interval

from .conftest import extracted, single_threaded, working_in

GRIDS = {"logreg": (1.0,), "linear": (1e-3,), "knn": (1, 3)}
FIGURES = ["accuracy_vs_time.png", "confusion.png", "learning_curves.png", "misclassified.png", "projection.png"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("report")
    with working_in(root):
        data, source = extracted(root, {"train": 12, "test": 5})
        heads = {}
        for clf, grid in GRIDS.items():
            heads[clf] = fit_head(HeadConfig(clf=clf, grid=grid, refine=0, epochs=5), source).path
            fit_head(HeadConfig(clf=clf, grid=grid, refine=0, epochs=5, subset=3), source, out=heads[clf].parent / "subset-3" / clf)
            evaluate(heads[clf])
            evaluate(heads[clf].parent / "subset-3" / f"{clf}.json")
        ft = finetune(FinetuneConfig(data=str(data), model="mobilenet_v2", weights="none", crop=32, resize=36, subset=3, epochs=2,
                                     batch_size=4, workers=0, device="cpu", optimizer="adamw", lr=1e-3, name="lp-ft",
                                     init_head=str(heads["linear"].parent / "subset-3" / "linear.json")), progress=False)
        evaluate(ft.path)
        ft.path = root / ft.path
        config = ReportConfig(projection_points=30, grid_images=6, quality_bar=0.5)
        result = build_report(source, config)
    return SimpleNamespace(root=root, source=source, heads=heads, ft=ft, config=config, result=result)


@pytest.fixture
def own(run: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """A copy of the shared run in this test's folder, for a test that changes what it holds (the shared run stays as made)."""
    root = tmp_path / "run"
    shutil.copytree(run.root, root, symlinks=True)
    monkeypatch.chdir(root)
    move = lambda p: root / Path(p).relative_to(run.root)  # noqa: E731
    source = replace(run.source, cache_dir=str(move(run.source.cache_dir)))
    with single_threaded():  # its own report: the shared one was made from files at other paths
        result = build_report(source, run.config)
    return SimpleNamespace(root=root, source=source, heads={clf: move(p) for clf, p in run.heads.items()},
                           ft=SimpleNamespace(path=move(run.ft.path)), config=run.config, result=result)


def _test_json(path: Path) -> dict:
    return json.loads(layout.evaluation_files(path).metrics.read_text())


def _edit(path: Path, **fields: object) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def _md_rows(md: str, section: str) -> dict[str, list[str]]:
    """Markdown table rows of one section (its heading starts with ``section``), by their first cell."""
    part = next(p for p in md.split("\n## ")[1:] if p.startswith(section))
    return {cells[0]: cells[1:] for line in part.splitlines() if line.startswith("| ")
            for cells in [[c.strip() for c in line.strip("|").split(" | ")]]}


def test_the_report_shows_every_head_and_the_finetune_with_their_figures(run: SimpleNamespace) -> None:
    result, root = run.result, run.root
    out = root / "reports" / "ds" / "mobilenet_v2-none"
    assert result.status == "written" and result.html == Path("reports/ds/mobilenet_v2-none/index.html")
    assert sorted(p.name for p in out.glob("*.png")) == FIGURES
    for name in FIGURES:
        with Image.open(out / name) as img:
            img.verify()
    md = (out / "index.md").read_text()
    page = (out / "index.html").read_text()
    rows = _md_rows(md, "Stage two")

    for clf, head in run.heads.items():
        m = _test_json(head)
        lo, hi = m["top1_ci"]
        assert (lo, hi) == wilson_interval(round(m["top1"] * m["n"]), m["n"])
        assert rows[clf][:3] == [f"{100 * m['top1']:.2f} %", f"{100 * lo:.2f}-{100 * hi:.2f} %", f"{100 * m['balanced_accuracy']:.2f} %"]
        assert f"<td>{clf}</td><td>{100 * m['top1']:.2f} %</td>" in page
    ft_metrics = _test_json(run.ft.path)
    rows = _md_rows(md, "Fine-tuning")
    assert rows["fine-tune lp-ft (3/class)"][0] == f"{100 * ft_metrics['top1']:.2f} %"
    subset = {clf: _test_json(h.parent / "subset-3" / f"{clf}.json") for clf, h in run.heads.items()}
    best_sub = max(subset, key=lambda c: json.loads((run.heads[c].parent / "subset-3" / f"{c}.json").read_text())["val_accuracy"])
    assert rows[f"best cached head, same images ({best_sub} (3/class))"][0] == f"{100 * subset[best_sub]['top1']:.2f} %"

    # The best model is the one chosen on val, reported with its test accuracy; so is the quality bar's head.
    val = {clf: json.loads(h.read_text())["val_accuracy"] for clf, h in run.heads.items()}
    test = {clf: _test_json(h)["top1"] for clf, h in run.heads.items()}
    val["fine-tune lp-ft (3/class)"] = json.loads(run.ft.path.read_text())["val_accuracy"]
    test["fine-tune lp-ft (3/class)"] = ft_metrics["top1"]
    data = json.loads((out / "report.json").read_text())
    assert data["best"]["val_accuracy"] == max(val.values()) and data["best"]["top1"] == test[data["best"]["label"]]
    assert f"Best model, chosen on val accuracy ({100 * max(val.values()):.2f} %): **{data['best']['label']}**" in md
    assert result.best == data["best"]
    head = data["best_head"]["label"]
    assert val[head] == max(v for k, v in val.items() if k in run.heads) and data["best_head"]["top1"] == test[head]
    lo, hi = data["best_head"]["top1_ci"]
    assert (f"the cached head chosen on val ({head}) reaches {100 * test[head]:.2f} % (95 % CI {100 * lo:.2f}-{100 * hi:.2f} %) against a bar of 50.00 %: "
            f"{'met' if test[head] >= 0.5 else '**not met**'}") in md
    assert "t-SNE of 15 cached test features (5 per class)" in md  # what it shows: 30 asked, 5 test images per class

    # The warnings fit-head and evaluate recorded, each once with the models it concerns.
    recorded: dict[str, list[str]] = {}
    labels = {**{h: clf for clf, h in run.heads.items()}, **{h.parent / "subset-3" / f"{clf}.json": f"{clf} (3/class)" for clf, h in run.heads.items()}}
    for head, label in labels.items():
        for w in json.loads(head.read_text())["warnings"] + _test_json(head)["warnings"]:
            recorded.setdefault(w, []).append(label)
    assert recorded, "the carved val split has fewer than 5 images per class: fit-head should have said so"
    assert {w["warning"]: sorted(w["models"]) for w in data["warnings"]} == {w: sorted(m) for w, m in recorded.items()}
    assert _md_rows(md, "Warnings") == {"warning": ["models"], **{w["warning"]: [", ".join(w["models"])] for w in data["warnings"]}}

    # Stage one: rows and throughput from the caches themselves.
    rows = _md_rows(md, "Stage one")
    with read_cache(data["caches"]["train"]["path"]) as cache:
        assert rows["train"][0] == f"{len(cache):,}" and rows["train"][4] == f"{cache.attrs['images_per_s']:.0f} img/s"

    # Self-contained: every image is embedded; the Markdown twin points at the PNGs beside it.
    sources = re.findall(r'<img [^>]*src="([^"]*)"', page)
    assert len(sources) == 5 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "<script" not in page and 'href="http' not in page
    assert sorted(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)) == FIGURES
    rows = _md_rows(md, "Settings")
    assert "torch" in rows and rows["model"][0] == "`mobilenet_v2`"


def test_the_best_model_is_chosen_on_val_not_on_test(own: SimpleNamespace) -> None:
    # logreg is the best on val and the worst on test; knn and the fine-tune are better on test, worse on val.
    fake = {"logreg": (0.9, 0.2), "linear": (0.5, 0.6), "knn": (0.3, 0.95)}
    for clf, (val, test) in fake.items():
        _edit(own.heads[clf], val_accuracy=val)
        _edit(layout.evaluation_files(own.heads[clf]).metrics, top1=test)
    _edit(own.ft.path, val_accuracy=0.4)
    _edit(layout.evaluation_files(own.ft.path).metrics, top1=0.99)
    # On the fine-tune's subset, linear is the best on val, knn the best on test.
    for clf, val in {"logreg": 0.5, "linear": 0.8, "knn": 0.1}.items():
        _edit(own.heads[clf].parent / "subset-3" / f"{clf}.json", val_accuracy=val)
    _edit(layout.evaluation_files(own.heads["knn"].parent / "subset-3" / "knn.json").metrics, top1=0.97)
    with single_threaded():
        result = build_report(own.source, own.config)
    assert result.status == "written"
    assert result.best["label"] == "logreg" and result.best["val_accuracy"] == 0.9 and result.best["top1"] == 0.2
    md = result.markdown.read_text()
    assert "Best model, chosen on val accuracy (90.00 %): **logreg**, test top-1 **20.00 %**" in md
    assert "the cached head chosen on val (logreg) reaches 20.00 % (95 % CI " in md and "against a bar of 50.00 %: **not met**" in md
    data = json.loads(layout.report_files(result.html.parent).data.read_text())
    assert data["best_head"]["label"] == "logreg"
    assert "best cached head, same images (linear (3/class))" in _md_rows(md, "Fine-tuning")
    assert list(_md_rows(md, "Stage two"))[1:] == ["logreg", "linear", "knn"]  # listed by val


def _set_answers(path: Path, right: np.ndarray | None = None, rename: bool = False) -> None:
    """Rewrite a model's saved test predictions: right exactly where ``right`` says, or with one image renamed."""
    preds = layout.evaluation_files(path).predictions
    with np.load(preds) as z:
        saved = {k: z[k] for k in z.files}
    if right is not None:
        saved["pred"] = np.where(right, saved["y"], (saved["y"] + 1) % 3)
    if rename:
        saved["paths"] = np.array(["elsewhere.png", *saved["paths"][1:]])
    np.savez(preds, **saved)


def test_the_report_says_which_differences_from_the_chosen_head_are_within_the_noise(own: SimpleNamespace) -> None:
    # Made-up answers on the 15 test images: the chosen head (logreg, best on val) wrong on all, linear right on all,
    # knn as logreg; the fine-tune's predictions name another image.
    for clf, val in {"logreg": 0.9, "linear": 0.5, "knn": 0.4}.items():
        _edit(own.heads[clf], val_accuracy=val)
    _set_answers(own.heads["logreg"], np.zeros(15, bool))
    _set_answers(own.heads["linear"], np.ones(15, bool))
    _set_answers(own.heads["knn"], np.zeros(15, bool))
    _set_answers(own.ft.path, rename=True)
    with single_threaded():
        result = build_report(own.source, own.config, force=True)
    noise = {r["label"]: r for r in json.loads(layout.report_files(result.html.parent).data.read_text())["noise"]}
    assert set(noise) == {"linear", "knn", "logreg (3/class)", "linear (3/class)", "knn (3/class)", "fine-tune lp-ft (3/class)"}
    assert noise["linear"]["only_other"] == 15 and noise["linear"]["only_chosen"] == 0
    assert noise["linear"]["p"] == pytest.approx(2 / 2**15) and not noise["linear"]["within_noise"]
    assert noise["knn"]["p"] == 1.0 and noise["knn"]["within_noise"]
    assert noise["fine-tune lp-ft (3/class)"]["why"] == "not scored on the same test images"
    for clf in GRIDS:  # the subset heads' own answers, paired image by image with the chosen head's
        theirs = load_predictions(own.heads[clf].parent / "subset-3" / f"{clf}.json")
        assert noise[f"{clf} (3/class)"]["p"] == pytest.approx(mcnemar(np.zeros(15, bool), theirs["y"] == theirs["pred"]))
    md = result.markdown.read_text()
    rows = _md_rows(md, "Differences from the chosen head")
    assert rows["linear"][2:] == ["15", "0", f"{2 / 2**15:.3g}", "**better**"]
    assert rows["knn"][2:] == ["0", "0", "1", "within the noise"]
    assert rows["fine-tune lp-ft (3/class)"][2:] == ["–", "–", "–", "not scored on the same test images"]
    assert "Against the head chosen on val (logreg, test top-1 " in md and "on the same 15 test images" in md


def test_a_failed_render_is_an_os_error_for_the_command_line(run: SimpleNamespace, tmp_path: Path) -> None:
    with pytest.raises(RenderError, match="chromium could not render .*index.html") as caught:
        check_render(run.root / run.result.html, chromium="false")
    assert isinstance(caught.value, OSError)
    with pytest.raises(FileNotFoundError, match="no chromium on PATH"), pytest.MonkeyPatch.context() as m:
        m.setenv("PATH", str(tmp_path))
        check_render(run.root / run.result.html)


def test_the_report_is_reused_until_something_it_shows_changes(own: SimpleNamespace) -> None:
    with single_threaded():
        html = own.result.html
        stamp = html.stat().st_mtime_ns
        again = build_report(own.source, own.config)
        assert again.status == "up-to-date" and html.stat().st_mtime_ns == stamp
        fit_head(HeadConfig(clf="knn", grid=(2,), refine=0), own.source)  # a changed head, not yet evaluated
        assert build_report(own.source, own.config).status == "written"
        evaluate(own.heads["knn"])
        assert build_report(own.source, own.config).status == "written"
        assert _md_rows(html.with_name("index.md").read_text(), "Stage two")["knn"][6] == "n_neighbors=2"
        assert build_report(own.source, replace(own.config, grid_images=4)).status == "written"
        assert build_report(own.source, own.config, force=True).status == "written"


def test_a_report_needs_evaluated_heads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: SimpleNamespace) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="no train and test caches .* run pipeline extract"):
        build_report(replace(run.source, cache_dir=str(tmp_path / "none")))
    with pytest.raises(ValueError, match="projection must be one of tsne, pca"):
        ReportConfig(projection="umap")
    # Caches, but no head evaluated on test.
    src = replace(run.source, cache_dir=str(tmp_path / "features"))
    for split in ("train", "val", "test"):
        extract(replace(src, split=split), progress=False)
    fit_head(HeadConfig(clf="logreg", grid=(1.0,), refine=0), src)
    with pytest.raises(ValueError, match="no head in .* was evaluated on test"):
        build_report(src)


@pytest.mark.skipif(find_chromium() is None, reason="no chromium on PATH")
def test_the_page_renders_in_headless_chromium_and_a_broken_image_is_caught(run: SimpleNamespace, tmp_path: Path) -> None:
    html = run.root / run.result.html
    seen = check_render(html, screenshot=tmp_path / "shot.png", record=tmp_path / "check.json")
    assert seen.ok and seen.images == 5 and seen.broken == [] and seen.height > 1000 and not seen.reused
    again = check_render(html, screenshot=tmp_path / "shot.png", record=tmp_path / "check.json", chromium="false")
    assert again.reused and (again.images, again.height, again.screenshot) == (seen.images, seen.height, seen.screenshot)
    with Image.open(seen.screenshot) as shot:
        assert np.asarray(shot.convert("L")).std() > 10  # not a blank page
    broken = tmp_path / "broken.html"
    text = html.read_text()
    start = text.index('alt="Confusion matrix')
    at = text.index("base64,", start) + len("base64,")
    broken.write_text(text[:at] + "AAAA" + text[at + 200:])
    seen = check_render(broken)
    assert not seen.ok and len(seen.broken) == 1 and seen.broken[0].startswith("Confusion matrix")


def test_a_render_check_is_reused_only_for_the_same_page_bytes_and_a_passed_check(tmp_path: Path) -> None:
    page = tmp_path / "index.html"
    page.write_text("<html><body><img alt='a' src='x.png'></body></html>")
    record = tmp_path / "check.json"

    def write(**fields: object) -> None:
        base = {"page_sha256": hashlib.sha256(page.read_bytes()).hexdigest(), "images": 1, "broken": [], "height": 900, "screenshot": None}
        record.write_text(json.dumps({**base, **fields}))

    write()
    assert check_render(page, chromium="false", record=record).reused  # "false" would fail: Chromium was not started
    for stale in ({"page_sha256": "0" * 64}, {"broken": ["a"]}, {"images": 0}):
        write(**stale)
        with pytest.raises(RenderError, match="chromium could not render"):
            check_render(page, chromium="false", record=record)
    write(screenshot=str(tmp_path / "gone.png"))  # the screenshot asked for is not there any more
    with pytest.raises(RenderError):
        check_render(page, chromium="false", record=record, screenshot=tmp_path / "gone.png")


def test_the_report_command(own: SimpleNamespace) -> None:
    args = ["report", "--data", own.source.data, "--weights", "none", "--cache-dir", own.source.cache_dir, "--projection-points", "30",
            "--grid-images", "6", "--quality-bar", "0.5"]
    with single_threaded():
        result = CliRunner().invoke(cli, [*args, "--force"])
    assert result.exit_code == 0, result.output
    assert "report written in " in result.output and "best model: " in result.output
    result = CliRunner().invoke(cli, [*args, "--check"])
    assert result.exit_code == 0, result.output
    assert "is up to date; nothing to do" in result.output
    if find_chromium():
        assert "rendered in headless Chromium: 5 images, all decoded" in result.output
    else:
        assert "render check skipped: no chromium on PATH" in result.output


def _metrics_line(m: dict) -> str:
    lo, hi = m["top1_ci"]
    return (f"test top-1 {m['top1']:.4f} (95 % CI {lo:.4f}-{hi:.4f}), balanced accuracy {m['balanced_accuracy']:.4f}, "
            f"ECE {m['ece']:.4f} on 15 images")


def test_subset_heads_and_lp_ft_from_the_command_line(own: SimpleNamespace) -> None:
    Path("pipeline.toml").write_text(f'[extract]\ndata = "{own.source.data}"\nweights = "none"\ncache_dir = "{own.source.cache_dir}"\n'
                                     'crop = 32\nresize = 36\n')
    heads = own.heads["logreg"].parent
    invoke = lambda *args: CliRunner().invoke(cli, [str(a) for a in args])  # noqa: E731
    with single_threaded():
        r = invoke("fit-head", "--clf", "logreg", "--grid", "0.5", "--refine", "0", "--subset", "2")
        assert r.exit_code == 0, r.output
        assert r.stdout.strip().endswith(f"-> {heads / 'subset-2' / 'logreg.json'}")  # the warnings go to stderr
        assert json.loads((heads / "subset-2" / "logreg.json").read_text())["subset"]["rows"] == 6
        r = invoke("evaluate", "--clf", "logreg", "--subset", "2")
        assert r.exit_code == 0 and r.output.startswith("logreg: test top-1 ") and (heads / "subset-2" / "logreg-test.json").is_file()
        # Several heads in one command, each evaluated after its fit: what make heads runs.
        several = ["fit-head", "--clf", "logreg", "--clf", "knn", "--refine", "0", "--subset", "2", "--evaluate"]
        r = invoke(*several)
        assert r.exit_code == 0, r.output
        results = [line for line in r.output.splitlines() if not line.startswith(("  logreg C=", "  knn n_neighbors=", "warning: "))]
        m = {clf: json.loads((heads / "subset-2" / f"{clf}-test.json").read_text()) for clf in ("logreg", "knn")}
        assert [line.split(":")[0] for line in results[::2]] == ["logreg", "knn"]
        assert results[1::2] == [f"  {_metrics_line(m[c])} -> {heads / 'subset-2' / f'{c}-test.json'}" for c in ("logreg", "knn")]
        again = [line for line in invoke(*several).output.splitlines() if not line.startswith("warning: ")]
        assert [line.split(":")[0] + ": " + line.split(": ")[1][:10] for line in again[::2]] == ["logreg: up to date", "knn: up to date"]
        assert all(line.endswith("images (up to date) -> " + str(heads / "subset-2" / f"{c}-test.json")) for line, c in zip(again[1::2], ("logreg", "knn")))
        assert invoke("fit-head", "--clf", "logreg", "--clf", "knn", "-o", "x").exit_code == 2

        args = ["finetune", "--subset", "3", "--epochs", "1", "--batch-size", "4", "--workers", "0", "--device", "cpu", "--name", "cli-ft",
                "--no-progress", "--evaluate"]
        r = invoke(*args, "--init-head", "subset-3/linear")
        assert r.exit_code == 0, r.output
        run_dir = Path("runs/ds/mobilenet_v2-none/cli-ft")
        assert json.loads((run_dir / "model.json").read_text())["init_head"] == str(heads / "subset-3" / "linear.json")
        m = json.loads((run_dir / "model-test.json").read_text())
        assert f"  {_metrics_line(m)} -> " in r.output
        r = invoke(*args, "--init-head", "subset-9/linear")
        assert r.exit_code == 1 and "--init-head subset-9/linear: no head file of that name" in r.output


def test_the_report_lists_the_commands_that_made_it_and_what_stage_one_skipped_ignored_or_decoded_specially(tmp_path: Path) -> None:
    from .conftest import make_image_folder

    data = make_image_folder(tmp_path / "ds", {"train": 10, "test": 3})
    (data / "train" / "ant" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    broken = sorted((data / "test").rglob("*.png"))[0]
    broken.write_bytes(broken.read_bytes()[:40])
    Image.fromarray(np.full((36, 44), 40000, np.uint16)).save(data / "test" / "ant" / "deep.png")  # mode I;16
    tiny = f"--data {data} --weights none --crop 32 --resize 36 --batch-size 4 --workers 0 --engine eager --device cpu"
    commands = [f"extract {tiny} --split train --split val --split test --on-error skip --no-progress",
                f"fit-head --data {data} --weights none --clf logreg --grid 1 --refine 0 --evaluate",
                f"report --data {data} --weights none --projection-points 20 --grid-images 4"]
    with single_threaded():
        result = CliRunner().invoke(cli, ["run", *commands])
    assert result.exit_code == 0, result.output
    md = Path("reports/ds/mobilenet_v2-none/index.md").read_text()
    rows = _md_rows(md, "Settings, versions and how to rerun")
    assert [c for c in rows if c.startswith("`pipeline")] == [f"`pipeline {c}`" for c in commands]
    stage1 = md.split("## Stage one")[1].split("\n## ")[0]
    assert "1 unreadable image(s) were skipped" in stage1 and f"`{broken.relative_to(data).as_posix()}`" in stage1
    assert "were ignored, as torchvision's ImageFolder ignores them: 1 in train, 1 in val." in stage1
    assert "16-bit images were scaled to 8 bits (0-65535 onto 0-255), not clipped (1 in test)" in stage1


def test_the_taps_auto_tried_are_listed_with_their_val_accuracy(own: SimpleNamespace) -> None:
    tried = [{"tap": "features.16:output", "val_accuracy": 0.5, "value": 1.0}, {"tap": "classifier:input", "val_accuracy": 0.75, "value": 1.0}]
    _edit(own.heads["logreg"], tap="classifier:input", taps_tried=tried)
    _edit(own.heads["knn"], tap="features.16:output")
    with single_threaded():
        md = build_report(own.source, own.config).markdown.read_text()
    # This cache holds one tap, so the heads' table has no tap column; a cache of several taps gets one (test_fit).
    assert not re.search(r"^\| head \| test top-1 \|.* \| tap \|$", md, re.M)
    part = md.split("Taps compared on val")[1]
    assert "| logreg | `features.16:output` | 50.00 % | C=1 |  |" in part and "| logreg | `classifier:input` | 75.00 % | C=1 | yes |" in part
