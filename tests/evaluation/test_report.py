"""The HTML report: content, self-containment and, in a headless browser, that it renders."""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from nidl_dino.errors import UserError
from nidl_dino.evaluation.probes import compare_to_baselines
from nidl_dino.evaluation.report import THUMBNAIL_WIDTH, write_report
from nidl_dino.workflow.layout import ScanFiles

CHROMIUM = Path("/usr/bin/chromium")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EXCLUDED_SCAN = "sub-03_ses-1"
EXCLUDED_REASON = "registration failed: similarity 0.12 below 0.5"
FEATURE_SETS = ["chance", "dino", "intensity_pca", "brain_volume"]
COLUMNS = [("age", "mae"), ("age", "r2"), ("sex", "roc_auc"), ("sex", "balanced_accuracy")]


# ---------------------------------------------------------------- fake run outputs


def _save_png(fig: Figure, path: Path) -> Path:
    fig.savefig(path, format="png")
    return path


def _qc_png(path: Path, title: str, rng: np.random.Generator) -> Path:
    fig = Figure(figsize=(9, 3.4), dpi=100, facecolor="black")
    ax = fig.add_axes((0, 0, 1, 0.85))
    ax.imshow(rng.random((34, 90)), cmap="gray")
    ax.axis("off")
    fig.text(0.5, 0.95, title, color="white", ha="center")
    return _save_png(fig, path)


def _text_png(path: Path, title: str, note: str) -> Path:
    fig = Figure(figsize=(6, 1.6), dpi=100, facecolor="black")
    fig.text(0.5, 0.65, title, color="white", ha="center")
    fig.text(0.5, 0.3, note, color="red", ha="center")
    return _save_png(fig, path)


def _make_inputs(folder: Path, *, site: bool = True, age: bool = True) -> dict:
    """Every input of write_report, small and random, in ``folder``."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    subjects = [f"sub-{i:02d}" for i in range(1, 5)]
    qc = pd.DataFrame(
        {
            "participant_id": subjects,
            "session_id": ["ses-1"] * len(subjects),
            "status": ["ok", "ok", "excluded", "ok"],
            "reason": ["", "", EXCLUDED_REASON, ""],
            "scan_id": [f"{s}_ses-1" for s in subjects],
            "metrics.registration_similarity": [0.91, 0.88, 0.12, 0.93],
            "metrics.etiv_ml": [1450.2, 1380.0, np.nan, 1512.7],
        }
    )
    qc.to_csv(folder / "qc.tsv", sep="\t", index=False, na_rep="n/a")
    pngs = {}
    for scan, status, reason in zip(qc["scan_id"], qc["status"], qc["reason"], strict=True):
        path = ScanFiles(folder, scan).qc_png  # the name preprocessing gives it
        if status == "ok":
            pngs[scan] = _qc_png(path, f"{scan}: ok", rng)
        else:
            pngs[scan] = _text_png(path, f"{scan}: excluded", reason)

    fig = Figure(figsize=(8, 2), dpi=60)
    for i, ax in enumerate(fig.subplots(1, 4)):
        ax.plot(np.arange(20), np.exp(-np.arange(20) / (i + 3)))
    curves = _save_png(fig, folder / "training_curves.png")

    scores = []
    for name in FEATURE_SETS:
        for target, metric in COLUMNS:
            scores.append(
                {
                    "feature_set": name,
                    "target": target,
                    "task": "regression" if target == "age" else "classification",
                    "metric": metric,
                    "mean": rng.uniform(2, 9) if metric == "mae" else rng.uniform(0.3, 0.9),
                    "std": rng.uniform(0.01, 0.5),
                    "n_folds": 15,
                    "n_samples": 28,
                    "n_features": {"chance": 0, "dino": 128, "brain_volume": 1}.get(name, 32),
                }
            )
    scores = pd.DataFrame(scores)
    scores.to_csv(folder / "probe_scores.tsv", sep="\t", index=False)

    n = 30
    cohort = pd.DataFrame(
        {
            "participant_id": [f"sub-{i:02d}" for i in range(n)],
            "session_id": "ses-1",
            "status": ["excluded" if i in (3, 17) else "ok" for i in range(n)],
            "reason": ["bad" if i in (3, 17) else "" for i in range(n)],
            "sex": rng.choice(["F", "M"], n),
            "model_id": "dino-small_cnn-0123456789ab",
        }
    )
    if age:
        cohort["age"] = rng.uniform(20, 80, n).round(1)
    if site:
        cohort["site"] = rng.choice(["siteA", "siteB", "siteC"], n)
    features = rng.standard_normal((n, 16))
    features[cohort["status"] == "excluded"] = np.nan
    cohort = pd.concat(
        [cohort, pd.DataFrame(features, columns=[f"feature_{j:04d}" for j in range(16)])], axis=1
    )
    cohort.to_parquet(folder / "cohort.parquet", index=False)

    ages = rng.uniform(20, 80, n)
    predictions = []
    for name in FEATURE_SETS:
        for repeat in range(2):
            for i in range(n):
                predictions.append(
                    {
                        "feature_set": name,
                        "target": "age",
                        "task": "regression",
                        "row": str(i),
                        "participant_id": f"sub-{i:02d}",
                        "session_id": "ses-1",
                        "repeat": repeat,
                        "fold": i % 5,
                        "y_true": ages[i],
                        "y_pred": ages[i] + rng.normal(0, 3 if name == "dino" else 9),
                    }
                )
                predictions.append(
                    {
                        **predictions[-1],
                        "target": "sex",
                        "task": "classification",
                        "y_true": float(i % 2),
                        "y_pred": rng.uniform(),
                    }
                )
    predictions = pd.DataFrame(predictions)
    predictions.to_csv(folder / "predictions.tsv", sep="\t", index=False)
    # written by the probe job; the report reads it (the numbers are checked from the predictions)
    compare_to_baselines(predictions).to_csv(folder / "comparison.tsv", sep="\t", index=False)

    summary = {
        "model_id": "dino-small_cnn-0123456789ab",
        "global_step": 120,
        "epochs": 30,
        "n_train_volumes": 27,
        "final_loss": 6.2345,
        "resumed_from": None,
    }
    (folder / "training_summary.json").write_text(json.dumps(summary))
    config = {
        "encoder": {"name": "small_cnn", "kwargs": {}},
        "seed": 0,
        "views": {"global_size": [48, 48, 48], "local_size": [24, 24, 24], "num_local_crops": 8},
        "trainer": {"max_epochs": 30},
        "extract": {"pooling": "stages_mean_std"},
    }
    return {
        "qc_tsv": folder / "qc.tsv",
        "qc_pngs": pngs,
        "curves_png": curves,
        "probe_scores_tsv": folder / "probe_scores.tsv",
        "predictions_tsv": folder / "predictions.tsv",
        "comparison_tsv": folder / "comparison.tsv",
        "cohort_parquet": folder / "cohort.parquet",
        "training_summary_json": folder / "training_summary.json",
        "config": config,
    }


class _Page(HTMLParser):
    """Collects tables (cells with their bold flag), row classes, images, links and notes."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[dict]] = {}
        self.images: list[dict[str, str]] = []
        self.urls: list[str] = []
        self.tags: list[str] = []
        self._table: list[dict] | None = None
        self._cell: dict | None = None
        self._bold = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        self.urls += [attrs[k] for k in ("src", "href") if attrs.get(k)]
        if tag == "img":
            self.images.append(attrs)
        elif tag == "table" and attrs.get("id"):
            self._table = self.tables.setdefault(attrs["id"], [])
        elif tag == "tr" and self._table is not None:
            self._table.append({"class": attrs.get("class", ""), "cells": []})
        elif tag in ("td", "th") and self._table is not None:
            self._cell = {"text": "", "bold": False, "tag": tag}
            self._table[-1]["cells"].append(self._cell)
        elif tag == "b":
            self._bold = True

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None
        elif tag in ("td", "th"):
            self._cell = None
        elif tag == "b":
            self._bold = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell["text"] += data
            self._cell["bold"] |= self._bold and bool(data.strip())


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def _decode(uri: str) -> bytes:
    prefix = "data:image/png;base64,"
    assert uri.startswith(prefix), uri[:60]
    return base64.b64decode(uri[len(prefix) :], validate=True)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("report")
    inputs = _make_inputs(folder / "inputs")
    out = folder / "out" / "report.html"
    write_report(out, **inputs)
    return out, inputs


# ---------------------------------------------------------------- content


def test_probe_table_rows_columns_and_best_cells(report):
    out, inputs = report
    scores = pd.read_csv(inputs["probe_scores_tsv"], sep="\t")
    rows = _parse(out).tables["probe-table"]
    header = [c["text"] for c in rows[0]["cells"]]
    assert header == ["feature set", "features", "age", "sex"]
    metrics = [c["text"] for c in rows[1]["cells"]]
    assert metrics == ["MAE ↓", "R² ↑", "ROC-AUC ↑", "bal. acc. ↑"]
    body = rows[2:]
    # DINO first and highlighted, the others in file order.
    assert [r["cells"][0]["text"] for r in body] == [
        "dino",
        "chance",
        "intensity_pca",
        "brain_volume",
    ]
    assert body[0]["class"] == "dino" and all(r["class"] == "" for r in body[1:])
    for j, (target, metric) in enumerate(COLUMNS):
        column = scores[(scores["target"] == target) & (scores["metric"] == metric)]
        means = dict(zip(column["feature_set"], column["mean"], strict=True))
        best = min(means, key=means.get) if metric == "mae" else max(means, key=means.get)
        bold = [r["cells"][0]["text"] for r in body if r["cells"][2 + j]["bold"]]
        assert bold == [best], (target, metric)
        cell = next(r for r in body if r["cells"][0]["text"] == best)["cells"][2 + j]["text"]
        decimals = 2 if metric == "mae" else 3
        std = column.loc[column["feature_set"] == best, "std"].item()
        assert cell == f"{means[best]:.{decimals}f} ± {std:.{decimals}f}"


def test_excluded_scan_listed_with_reason(report):
    out, _ = report
    page = _parse(out)
    rows = page.tables["excluded-table"][1:]
    assert [[c["text"] for c in r["cells"]] for r in rows] == [
        [EXCLUDED_SCAN, "excluded", EXCLUDED_REASON]
    ]
    text = out.read_text(encoding="utf-8")
    tile = re.search(rf'<figure class="(\w+)" id="qc-{EXCLUDED_SCAN}">(.*?)</figure>', text)
    assert tile and tile.group(1) == "excluded" and EXCLUDED_REASON in tile.group(2)
    # Every scan has a tile, in QC-table order.
    tiles = re.findall(r'<figure class="(?:ok|excluded)" id="qc-([^"]+)"', text)
    assert tiles == ["sub-01_ses-1", "sub-02_ses-1", EXCLUDED_SCAN, "sub-04_ses-1"]


def test_header_lists_run_facts(report):
    out, _ = report
    text = out.read_text(encoding="utf-8")
    for fact in (
        "dino-small_cnn-0123456789ab",
        "4 (3 ok, 1 excluded)",
        "6.2345",
        "small_cnn",
        "48 × 48 × 48",
        "24 × 24 × 24",
        "stages_mean_std",
    ):
        assert fact in text, fact


def test_scatter_caption_reports_mae_of_repeat_averaged_predictions(report):
    out, inputs = report
    predictions = pd.read_csv(inputs["predictions_tsv"], sep="\t")
    text = out.read_text(encoding="utf-8")
    for name in FEATURE_SETS:
        errors = []
        for i in range(30):
            rows = predictions[
                (predictions["feature_set"] == name)
                & (predictions["target"] == "age")
                & (predictions["participant_id"] == f"sub-{i:02d}")
            ]
            errors.append(abs(rows["y_pred"].mean() - rows["y_true"].iloc[0]))
        assert f"{name} MAE {sum(errors) / len(errors):.2f}" in text


def test_every_image_is_an_embedded_png(report):
    import matplotlib.image

    out, inputs = report
    images = _parse(out).images
    # 4 QC thumbnails, the training curves, the scatter and the embedding.
    assert len(images) == len(inputs["qc_pngs"]) + 3
    for image in images:
        data = _decode(image["src"])
        assert data.startswith(PNG_MAGIC)
        pixels = matplotlib.image.imread(io.BytesIO(data), format="png")
        assert pixels.size > 0
        if image["alt"].startswith("QC of"):
            assert pixels.shape[1] <= THUMBNAIL_WIDTH


def test_page_is_self_contained(report):
    out, _ = report
    text = out.read_text(encoding="utf-8")
    page = _parse(out)
    assert not re.search(r"https?://", text)
    assert "script" not in page.tags and "iframe" not in page.tags
    assert all(url.startswith(("data:", "#")) for url in page.urls), page.urls
    assert not list(out.parent.glob(".*tmp*")), "temporary file left behind"


# ---------------------------------------------------------------- degraded inputs


def test_missing_optional_inputs_become_notes(tmp_path):
    inputs = _make_inputs(tmp_path / "inputs")
    inputs.update(
        probe_scores_tsv=None,
        predictions_tsv=tmp_path / "absent.tsv",
        cohort_parquet=None,
        curves_png=None,
        training_summary_json=None,
        config=None,
    )
    out = tmp_path / "report.html"
    out.write_text("old")
    write_report(out, **inputs)
    text = out.read_text(encoding="utf-8")
    assert "No probe scores in this run." in text
    assert f"No probe predictions: {tmp_path / 'absent.tsv'} does not exist." in text
    assert "No cohort table in this run." in text
    assert "No training curves in this run." in text
    assert "No training summary." in text
    assert 'id="probe-table"' not in text
    assert len(_parse(out).images) == len(inputs["qc_pngs"])


def test_embedding_without_site_or_age_skips_those_panels(tmp_path):
    inputs = _make_inputs(tmp_path / "inputs", site=False, age=False)
    out = tmp_path / "report.html"
    write_report(out, **inputs)
    text = out.read_text(encoding="utf-8")
    assert "No site panel" in text and "No age panel" in text
    assert 'alt="PCA embedding of the features"' in text


def test_scan_ids_derived_from_ids_when_qc_table_has_none(tmp_path):
    inputs = _make_inputs(tmp_path / "inputs")
    qc = pd.read_csv(inputs["qc_tsv"], sep="\t")
    qc.drop(columns="scan_id").to_csv(inputs["qc_tsv"], sep="\t", index=False)
    out = tmp_path / "report.html"
    write_report(out, **inputs)
    text = out.read_text(encoding="utf-8")
    assert re.findall(r'id="qc-([^"]+)"', text) == list(qc["scan_id"])
    assert text.count('alt="QC of ') == len(qc)


def test_missing_qc_table_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="qc.tsv: QC table not found"):
        write_report(
            tmp_path / "r.html",
            qc_tsv=tmp_path / "qc.tsv",
            qc_pngs={},
            curves_png=None,
            probe_scores_tsv=None,
            predictions_tsv=None,
            cohort_parquet=None,
        )
    assert not (tmp_path / "r.html").exists()


def test_probe_table_without_required_columns_is_a_user_error(tmp_path):
    inputs = _make_inputs(tmp_path / "inputs")
    pd.DataFrame({"feature_set": ["dino"]}).to_csv(inputs["probe_scores_tsv"], sep="\t")
    with pytest.raises(UserError, match="probe_scores.tsv: missing column"):
        write_report(tmp_path / "r.html", **inputs)


# ---------------------------------------------------------------- in a browser


def _chromium(profile: Path, *args: str) -> subprocess.CompletedProcess:
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
    ]  # fmt: skip
    return subprocess.run(
        [str(CHROMIUM), *flags, *args], capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.slow
def test_report_renders_in_headless_chromium(report, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is absent; install Debian's chromium package")
    out, inputs = report
    url = out.resolve().as_uri()

    dom = _chromium(tmp_path / "profile-dom", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    errors = [
        line for line in dom.stderr.splitlines()
        if re.search(r"Uncaught|CONSOLE|console|Failed to load|net::ERR", line)
    ]  # fmt: skip
    assert not errors, errors
    page = _Page()
    page.feed(dom.stdout)
    rows = page.tables["probe-table"]
    assert [r["cells"][0]["text"] for r in rows[2:]][0] == "dino"
    assert len(page.images) == len(inputs["qc_pngs"]) + 3
    for image in page.images:
        assert _decode(image["src"]).startswith(PNG_MAGIC)

    shot = tmp_path / "report.png"
    run = _chromium(
        tmp_path / "profile-shot", f"--screenshot={shot}", "--window-size=1400,3000",
        "--hide-scrollbars", url,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert shot.read_bytes().startswith(PNG_MAGIC)


def test_comparison_table_pairs_dino_with_each_baseline(report):
    out, inputs = report
    predictions = pd.read_csv(inputs["predictions_tsv"], sep="\t")
    rows = _parse(out).tables["comparison-table"]
    body = [[c["text"] for c in r["cells"]] for r in rows[1:]]
    baselines = [name for name in FEATURE_SETS if name != "dino"]
    assert [(r[0], r[2]) for r in body] == [(t, b) for t in ("age", "sex") for b in baselines]
    # age MAE of chance's folds minus DINO's, averaged over the (repeat, fold) test folds
    age = predictions[predictions["target"] == "age"].assign(
        err=lambda d: (d["y_true"] - d["y_pred"]).abs()
    )
    mae = age.groupby(["feature_set", "repeat", "fold"])["err"].mean()
    gain = mae["chance"] - mae["dino"]
    row = next(r for r in body if r[0] == "age" and r[2] == "chance")
    assert row[3] == f"{gain.mean():+.2f} ± {gain.std(ddof=1):.2f}"
    assert row[4] == f"{(gain > 0).sum()}/{len(gain)}"


def test_small_cohort_is_flagged_as_too_small_to_judge(report):
    out, inputs = report
    predictions = pd.read_csv(inputs["predictions_tsv"], sep="\t")
    n = predictions[predictions["feature_set"] == "dino"]["participant_id"].nunique()
    assert n < 50
    text = out.read_text()
    assert 'id="too-small"' in text
    assert f"{n} usable scans" in text and "too small to judge" in text


def test_page_stays_small_and_montage_pages_hold_every_scan(tmp_path):
    import matplotlib.image

    from nidl_dino.evaluation import report as rep

    picture = tmp_path / "qc.png"
    # small: the test is about how many tiles and pages, not about encoding pictures
    matplotlib.image.imsave(picture, np.random.default_rng(0).random((40, 120, 3)))
    n_ok, n_bad = 1200, 170
    ids = [f"sub-{i:05d}" for i in range(n_ok + n_bad)]
    qc = pd.DataFrame(
        {
            "participant_id": ids,
            "session_id": "",
            "status": ["ok"] * n_ok + ["excluded"] * n_bad,
            "reason": [""] * n_ok + ["registration failed"] * n_bad,
            "scan_id": ids,
            "metrics.snr": 1.0,
        }
    )
    qc.to_csv(tmp_path / "qc.tsv", sep="\t", index=False)
    pngs = {scan: picture for scan in ids}
    out = tmp_path / "report" / "report.html"
    write_report(
        out, qc_tsv=tmp_path / "qc.tsv", qc_pngs=pngs, montage_dir=tmp_path / "report/montage"
    )
    text = out.read_text()
    tiles = text.count("<figure class=")
    assert tiles == rep.MAX_EXCLUDED_TILES + rep.SAMPLE_OK_TILES
    assert text.count('<figure class="excluded"') == rep.MAX_EXCLUDED_TILES
    # the same sample on a rerun
    write_report(
        out, qc_tsv=tmp_path / "qc.tsv", qc_pngs=pngs, montage_dir=tmp_path / "report/montage"
    )
    assert out.read_text().count("<figure") == tiles
    assert re.findall(r'id="qc-(sub-\d+)"', text) == re.findall(
        r'id="qc-(sub-\d+)"', out.read_text()
    )
    pages = sorted((tmp_path / "report/montage").glob("page-*.html"))
    expected_pages = -(-(n_ok + n_bad) // rep.MONTAGE_PAGE_TILES)
    assert len(pages) == expected_pages
    listed = []
    for page in pages:
        body = page.read_text()
        for src in re.findall(r'<img alt="QC of [^"]+" loading="lazy" src="([^"]+)"', body):
            assert (page.parent / src).resolve() == picture.resolve()
        listed += re.findall(r'id="qc-(sub-\d+)"', body)
        assert page.stat().st_size < 1e6
    assert listed == ids
    # the page links every montage page, relative to itself
    for page in pages:
        assert f'href="montage/{page.name}"' in text


def test_page_size_is_bounded_whatever_the_cohort(tmp_path):
    # every inline tile costs about 20 kB: the cap, not the cohort, sets the size
    from nidl_dino.evaluation import report as rep

    assert (rep.MAX_EXCLUDED_TILES + rep.SAMPLE_OK_TILES) * 25_000 < 6e6


def test_comparison_is_read_from_the_probe_jobs_table_not_recomputed(tmp_path):
    inputs = _make_inputs(tmp_path / "inputs")
    comparison = pd.read_csv(inputs["comparison_tsv"], sep="\t")
    first = comparison.index[0]
    comparison.loc[first, ["gain_mean", "gain_std"]] = [12.5, 0.25]  # not what the folds give
    comparison.to_csv(inputs["comparison_tsv"], sep="\t", index=False)
    out = tmp_path / "report.html"
    write_report(out, **inputs)
    rows = _parse(out).tables["comparison-table"]
    shown = {
        (r["cells"][0]["text"], r["cells"][2]["text"]): r["cells"][3]["text"] for r in rows[1:]
    }
    key = (comparison.loc[first, "target"], comparison.loc[first, "baseline"])
    assert shown[key] == "+12.50 ± 0.25"
