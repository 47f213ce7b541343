"""The HTML report of a run: one self-contained page a person opens in a browser.

The page holds, in order: a header (run date, model id, scans kept and excluded, training
summary, key configuration values), the probe table, a predicted-versus-true scatter of every
regression target (age), a 2D PCA embedding of the features coloured by age and by site, the
training curves, the excluded scans with their reasons, the QC measures, and the QC pictures of
the excluded scans and of a fixed sample of the others; the QC picture of every scan is on
separate montage pages (``montage/page-NNN.html``) that the page links to, so the page stays
under 10 MB at any cohort size.

Everything is inline: CSS in a ``<style>`` element, every picture a base64 PNG ``data:`` URI, no
JavaScript and no reference outside the file, so the page can be mailed or archived as is.
Figures are drawn with :class:`matplotlib.figure.Figure` (no pyplot state). QC pictures are
shrunk by area averaging to :data:`THUMBNAIL_WIDTH` pixels and posterised to
:data:`THUMBNAIL_LEVELS` levels per channel, which roughly halves their PNG size with no visible
loss; a tile costs about 20 kB of the page (base64 included).

Inputs other than the QC table are optional: a missing one (``None`` or a file that does not
exist, e.g. no probe table when probes are off) becomes a note in its section.

Example (paths of a run's layout, :mod:`nidl_dino.workflow.layout`):
    >>> from nidl_dino.workflow.layout import Layout
    >>> layout = Layout("results")
    >>> write_report(
    ...     layout.report_html,
    ...     qc_tsv=layout.qc_tsv,
    ...     qc_pngs={"sub-01": layout.scan("sub-01").qc_png},
    ...     curves_png=layout.training_curves,
    ...     probe_scores_tsv=layout.probe_scores,
    ...     predictions_tsv=layout.probe_predictions,
    ...     cohort_parquet=layout.cohort_parquet,
    ... )  # doctest: +SKIP
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import html
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from nidl_dino.atomic import write_text_atomic
from nidl_dino.errors import UserError
from nidl_dino.evaluation.figures import (
    DINO,
    THUMBNAIL_WIDTH,
    embedding_figure,
    feature_names,
    pca_embedding,
    png_bytes,
    predicted_vs_true,
    thumbnail,
)
from nidl_dino.evaluation.probes import METRIC_LABELS, format_gain, judgement_caveat
from nidl_dino.workflow.tables import read_qc_table

log = logging.getLogger(__name__)

#: Inline QC thumbnails on the page, whatever the cohort size (each costs about 20 kB): every
#: excluded scan up to this many, then a sample of the scans that passed QC.
MAX_EXCLUDED_TILES = 150
SAMPLE_OK_TILES = 48
#: Tiles per page of the full montage (``montage/page-NNN.html``, linked pictures, not inline).
MONTAGE_PAGE_TILES = 500
#: QC measures listed on the page up to this many scans (beyond: qc.tsv holds them).
MAX_MEASURE_ROWS = 1000
#: Metrics for which a lower value is better (all others: higher is better).
LOWER_IS_BETTER = frozenset({"mae"})
#: (label, dotted config key) shown in the header when a config is given and has the key.
CONFIG_KEYS: tuple[tuple[str, str], ...] = (
    ("encoder", "encoder.name"),
    ("encoder kwargs", "encoder.kwargs"),
    ("global views (voxels)", "views.global_size"),
    ("local views (voxels)", "views.local_size"),
    ("local crops", "views.num_local_crops"),
    ("epochs", "trainer.max_epochs"),
    ("batch size", "data.batch_size"),
    ("learning rate", "dino.learning_rate"),
    ("teacher temperature", "dino.teacher_temperature"),
    ("prototypes", "dino.proj_output_dim"),
    ("feature readout", "extract.pooling"),
    ("probes adjusted for", "probes.covariates"),
    ("seed", "seed"),
    ("BIDS dataset", "bids_dir"),
)

_PROBE_COLUMNS = ("feature_set", "target", "metric", "mean", "std")
_PREDICTION_COLUMNS = ("feature_set", "target", "task", "y_true", "y_pred")

_CSS = """
:root { --ink: #1d2330; --muted: #5b6475; --rule: #d5dae3; --accent: #1f5fae;
        --dino: #e8f0fb; --bad: #c0262d; --ok: #2f7d32; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color: var(--ink); background: #f6f7f9; }
main { max-width: 1320px; margin: 0 auto; padding: 24px 32px 64px; background: #fff; }
h1 { margin: 0 0 4px; font-size: 26px; }
h2 { margin: 36px 0 10px; padding-bottom: 4px; border-bottom: 2px solid var(--rule);
     font-size: 20px; }
nav { margin: 8px 0 18px; font-size: 14px; }
nav a { margin-right: 14px; color: var(--accent); text-decoration: none; }
.subtitle, .caption, .note { color: var(--muted); font-size: 13.5px; }
.note { padding: 8px 12px; border-left: 4px solid var(--rule); background: #f3f4f7; }
.caveat { padding: 8px 12px; border-left: 4px solid #c77c02; background: #fff6e5; font-weight: 600; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 3px 18px; margin: 0; }
dl.facts dt { color: var(--muted); }
dl.facts dd { margin: 0; font-variant-numeric: tabular-nums; word-break: break-all; }
.cards { display: flex; flex-wrap: wrap; gap: 16px; }
.card { flex: 1 1 380px; padding: 12px 16px; border: 1px solid var(--rule); border-radius: 6px; }
.card h3 { margin: 0 0 8px; font-size: 15px; }
table { border-collapse: collapse; font-size: 14px; font-variant-numeric: tabular-nums; }
th, td { padding: 5px 10px; border-bottom: 1px solid var(--rule); text-align: right; }
th { background: #f3f4f7; }
th:first-child, td:first-child { text-align: left; }
th.target { text-align: center; border-bottom: 2px solid var(--rule); }
table.probes tr.dino td { background: var(--dino); }
table.probes tr.dino td:first-child { border-left: 4px solid var(--accent); font-weight: 600; }
table.probes td b { color: #000; }
table.listing th, table.listing td { text-align: left; }
td.reason { color: var(--bad); }
.status-ok { color: var(--ok); }
.status-excluded { color: var(--bad); font-weight: 600; }
figure.plot { margin: 8px 0; }
figure.plot img { max-width: 100%; height: auto; }
.montage { display: grid; grid-template-columns: repeat(auto-fill, minmax(300px, 1fr));
           gap: 12px; }
.montage figure { margin: 0; padding: 6px; border: 1px solid var(--rule); border-radius: 4px;
                  background: #000; }
.montage figure.excluded { border: 3px solid var(--bad); }
.montage img { display: block; width: 100%; height: auto; }
.montage figcaption { padding: 4px 2px 0; color: #eee; font-size: 12.5px; }
.montage figcaption .reason { display: block; color: #ff8a8a; }
.montage .missing { padding: 40px 8px; color: #aaa; text-align: center; }
details { margin-top: 10px; }
summary { cursor: pointer; color: var(--accent); }
.scroll { max-height: 480px; overflow: auto; }
pre { padding: 10px; background: #f3f4f7; font-size: 12.5px; overflow: auto; }
"""


def write_report(
    out_html: str | os.PathLike,
    *,
    qc_tsv: str | os.PathLike,
    qc_pngs: Mapping[str, str | os.PathLike],
    curves_png: str | os.PathLike | None = None,
    probe_scores_tsv: str | os.PathLike | None = None,
    predictions_tsv: str | os.PathLike | None = None,
    comparison_tsv: str | os.PathLike | None = None,
    cohort_parquet: str | os.PathLike | None = None,
    training_summary_json: str | os.PathLike | None = None,
    config: Mapping[str, Any] | None = None,
    title: str = "nidl-dino report",
    montage_dir: str | os.PathLike | None = None,
    model_card_md: str | os.PathLike | None = None,
) -> None:
    """Write the run's report as one self-contained HTML file (atomically).

    The page stays under 10 MB at any cohort size: it shows the QC pictures of the excluded scans
    (at most :data:`MAX_EXCLUDED_TILES`) and of a fixed sample of the others
    (:data:`SAMPLE_OK_TILES`); every scan's picture is on the montage pages written to
    ``montage_dir`` (:data:`MONTAGE_PAGE_TILES` per page, pictures linked, not embedded), which
    the page links to.

    Args:
        out_html: Destination ``.html`` file; parent folders are created.
        qc_tsv: ``qc/qc.tsv``: one row per scan with ``participant_id``, ``session_id``,
            ``status`` (``ok`` | ``excluded``), ``reason``, optionally ``scan_id`` (else
            ``sub-X[_ses-Y]`` is derived) and QC measures named ``metrics.*``.
        qc_pngs: Scan id -> QC picture (PNG); a scan without one gets a placeholder tile.
        curves_png: Training curves picture (:func:`nidl_dino.training.curves.plot_training_curves`).
        probe_scores_tsv: Probe scores (:func:`nidl_dino.evaluation.probes.write_probe_table`).
        predictions_tsv: Out-of-fold probe predictions (``run_probes(...,
            return_predictions=True)``), one row per feature set x target x repeat x test row.
        comparison_tsv: DINO against each baseline on the same folds, as the probe job wrote it
            (:func:`nidl_dino.evaluation.probes.compare_to_baselines`); read, not recomputed.
        cohort_parquet: Cohort table, one row per scan: ids, ``status``, participants columns
            (``age``, ``site``...), ``model_id``, ``feature_0000``... (NaN when excluded).
        training_summary_json: Training summary (``model_id``, ``global_step``, ``epochs``,
            ``final_loss``...).
        config: The run's configuration; its key values are listed in the header.
        title: Page title.
        montage_dir: Folder for the full montage pages (created; emptied of old pages); None
            writes none.
        model_card_md: The model card's Markdown (:func:`nidl_dino.model.card_markdown`),
            shown as text; None shows none.

    Raises:
        UserError: The QC table is missing, or an input lacks the columns it must have.
    """
    qc = _read_qc(qc_tsv)
    summary = _read_summary(training_summary_json)
    scores, scores_note = _read_optional(probe_scores_tsv, "probe scores", _read_tsv)
    if scores is not None:
        _require_columns(scores, _PROBE_COLUMNS, probe_scores_tsv)
    predictions, predictions_note = _read_optional(predictions_tsv, "probe predictions", _read_tsv)
    if predictions is not None:
        _require_columns(predictions, _PREDICTION_COLUMNS, predictions_tsv)
    cohort, cohort_note = _read_optional(cohort_parquet, "cohort table", pd.read_parquet)
    comparison, _ = _read_optional(comparison_tsv, "comparison", _read_tsv)

    sections = [
        ("probes", "Linear probes", _probe_section(scores, scores_note, predictions, comparison)),
        ("scatter", "Predicted versus true", _scatter_section(predictions, predictions_note)),
        ("embedding", "Feature embedding", _embedding_section(cohort, cohort_note)),
        ("training", "Training curves", _curves_section(curves_png)),
        ("model", "Model card", _model_card_section(model_card_md)),
        ("excluded", "Excluded scans", _excluded_section(qc)),
        ("qc", "QC montage", _montage_section(qc, qc_pngs, out_html, montage_dir)),
    ]
    nav = "".join(f'<a href="#{key}">{html.escape(name)}</a>' for key, name, _ in sections)
    body = "\n".join(
        f'<section id="{key}">\n<h2>{html.escape(name)}</h2>\n{content}\n</section>'
        for key, name, content in sections
    )
    page = (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        # An empty icon: otherwise the browser asks for /favicon.ico next to the file.
        '<link rel="icon" href="data:,">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<main>\n"
        f"{_header(title, qc, cohort, summary, config)}\n<nav>{nav}</nav>\n{body}\n"
        "</main>\n</body>\n</html>\n"
    )
    out = Path(out_html)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, page)
    log.info("report: %s (%.1f MB)", out, len(page) / 1e6)


def probe_table_html(scores: pd.DataFrame) -> str:
    """Probe scores as an HTML table: feature sets by target and metric, best cells in bold.

    Rows are the feature sets, :data:`DINO` first (highlighted), the others in the order of
    ``scores``; columns are the (target, metric) pairs in the order of ``scores``, under one
    header cell per target. Cells read ``mean ± std`` (2 decimals for MAE, 3 otherwise). In each
    column the best mean (lowest for :data:`LOWER_IS_BETTER` metrics, highest otherwise) is in
    ``<b>``, ties included.

    Args:
        scores: Long-form probe scores, columns ``feature_set``, ``target``, ``metric``,
            ``mean``, ``std`` (and optionally ``n_features``, ``n_samples``, ``n_folds``).

    Returns:
        An HTML ``<table class="probes">`` element followed by a caption paragraph.
    """
    names = list(dict.fromkeys(scores["feature_set"]))
    if DINO in names:
        names.remove(DINO)
        names.insert(0, DINO)
    columns = list(dict.fromkeys(zip(scores["target"], scores["metric"], strict=True)))
    cells = {(r.feature_set, r.target, r.metric): r for r in scores.itertuples(index=False)}
    best = {}
    for target, metric in columns:
        means = scores.loc[(scores["target"] == target) & (scores["metric"] == metric), "mean"]
        means = means.dropna()
        if len(means):
            best[target, metric] = means.min() if metric in LOWER_IS_BETTER else means.max()

    targets = list(dict.fromkeys(t for t, _ in columns))
    has_features = "n_features" in scores.columns
    top = ['<th rowspan="2">feature set</th>']
    if has_features:
        top.append('<th rowspan="2">features</th>')
    for target in targets:
        span = sum(t == target for t, _ in columns)
        top.append(f'<th colspan="{span}" class="target">{html.escape(str(target))}</th>')
    sub = []
    for _, metric in columns:
        arrow = "↓" if metric in LOWER_IS_BETTER else "↑"
        label = METRIC_LABELS.get(metric, str(metric))
        sub.append(
            f'<th class="metric" data-metric="{html.escape(str(metric))}">'
            f"{html.escape(label)} {arrow}</th>"
        )
    rows = []
    for name in names:
        cls = ' class="dino"' if name == DINO else ""
        row = [f"<td>{html.escape(str(name))}</td>"]
        if has_features:
            counts = scores.loc[scores["feature_set"] == name, "n_features"].dropna()
            row.append(f"<td>{int(counts.max()) if len(counts) else ''}</td>")
        for target, metric in columns:
            record = cells.get((name, target, metric))
            if record is None or pd.isna(record.mean):
                row.append("<td></td>")
                continue
            decimals = 2 if metric == "mae" else 3
            text = f"{record.mean:.{decimals}f} ± {record.std:.{decimals}f}"
            if record.mean == best.get((target, metric)):
                text = f"<b>{text}</b>"
            row.append(f"<td>{text}</td>")
        rows.append(f"<tr{cls}>{''.join(row)}</tr>")
    table = (
        '<table class="probes" id="probe-table">\n'
        f"<thead><tr>{''.join(top)}</tr><tr>{''.join(sub)}</tr></thead>\n"
        f"<tbody>{''.join(rows)}</tbody>\n</table>"
    )
    caption = (
        "Mean ± standard deviation over the cross-validation test folds; best of each column in "
        "bold (↓ lower is better, ↑ higher is better). MAE is in the target's units."
    )
    details = _probe_design(scores)
    return f'{table}\n<p class="caption">{html.escape(caption)}{details}</p>'


def _probe_design(scores: pd.DataFrame) -> str:
    """One phrase on the folds and samples behind the table, from its bookkeeping columns."""
    parts = []
    if "n_folds" in scores.columns and scores["n_folds"].notna().any():
        parts.append(f"{int(scores['n_folds'].max())} test folds")
    if "n_samples" in scores.columns:
        samples = scores.groupby("target", sort=False)["n_samples"].max().dropna()
        parts += [f"{int(n)} scans with {target}" for target, n in samples.items()]
    return html.escape(" " + "; ".join(parts) + ".") if parts else ""


# ---------------------------------------------------------------- reading inputs


def _read_tsv(path: str | os.PathLike) -> pd.DataFrame:
    ids = {"participant_id": str, "session_id": str, "row": str, "feature_set": str}
    return pd.read_csv(path, sep="\t", dtype=ids)


def _read_qc(path: str | os.PathLike) -> pd.DataFrame:
    if not Path(path).is_file():
        raise UserError(f"{path}: QC table not found; run the preprocessing rules first")
    try:
        qc = read_qc_table(path)
    except KeyError as err:
        raise UserError(
            f"{path}: missing column {err}; it was not written by this workflow"
        ) from err
    _require_columns(qc, ("participant_id", "status"), path)
    if "scan_id" not in qc.columns:  # the preprocessing prefix: sub-X[_ses-Y]
        qc["scan_id"] = [
            f"{p}_{s}" if s else str(p)
            for p, s in zip(qc["participant_id"], qc["session_id"], strict=True)
        ]
    qc["scan_id"] = qc["scan_id"].astype(str)
    return qc


def _read_summary(path: str | os.PathLike | None) -> dict[str, Any]:
    if path is None or not Path(path).is_file():
        return {}
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err}); rerun the training rule") from err


def _read_optional(
    path: str | os.PathLike | None, what: str, reader: Callable[[Any], pd.DataFrame]
) -> tuple[pd.DataFrame | None, str | None]:
    """``(content, None)``, or ``(None, note)`` when the input was not given or is absent."""
    if path is None:
        return None, f"No {what} in this run."
    if not Path(path).is_file():
        return None, f"No {what}: {path} does not exist."
    return reader(path), None


def _require_columns(table: pd.DataFrame, columns: Sequence[str], path: Any) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise UserError(f"{path}: missing column(s) {missing}; it was not written by this workflow")


# ---------------------------------------------------------------- sections


def _header(
    title: str,
    qc: pd.DataFrame,
    cohort: pd.DataFrame | None,
    summary: Mapping[str, Any],
    config: Mapping[str, Any] | None,
) -> str:
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    n_ok = int((qc["status"] == "ok").sum())
    n_excluded = int((qc["status"] == "excluded").sum())
    model_ids = [summary["model_id"]] if summary.get("model_id") else []
    if not model_ids and cohort is not None and "model_id" in cohort.columns:
        model_ids = sorted(str(m) for m in cohort["model_id"].dropna().unique())
    run = {
        "report written": now,
        "model id": ", ".join(model_ids) or "unknown",
        "scans": f"{len(qc)} ({n_ok} ok, {n_excluded} excluded)",
    }
    if config:
        run.update(
            {label: _format_value(key, value) for label, key, value in _config_values(config)}
        )
    cards = [_card("Run", run)]
    if summary:
        training = {
            "optimizer steps": summary.get("global_step"),
            "epochs": summary.get("epochs"),
            "training volumes": summary.get("n_train_volumes"),
            "final loss": summary.get("final_loss"),
            "resumed from": summary.get("resumed_from"),
        }
        training = {k: v for k, v in training.items() if v is not None}
        if isinstance(training.get("final loss"), float):
            training["final loss"] = f"{training['final loss']:.4f}"
        cards.append(_card("Training", training))
    else:
        cards.append(
            '<div class="card"><h3>Training</h3><p class="note">No training summary.</p></div>'
        )
    full_config = ""
    if config:
        text = json.dumps(config, indent=2, default=str)
        full_config = (
            "<details><summary>Full configuration</summary>"
            f"<pre>{html.escape(text)}</pre></details>"
        )
    return (
        f"<h1>{html.escape(title)}</h1>\n"
        '<p class="subtitle">DINO self-supervised features of brain MRI, probed for cohort '
        "variables against baselines.</p>\n"
        f'<div class="cards">{"".join(cards)}</div>{full_config}'
    )


def _config_values(config: Mapping[str, Any]) -> list[tuple[str, str, Any]]:
    found = []
    for label, key in CONFIG_KEYS:
        value: Any = config
        for part in key.split("."):
            if not isinstance(value, Mapping) or part not in value:
                break
            value = value[part]
        else:
            found.append((label, key, value))
    return found


def _format_value(key: str, value: Any) -> str:
    if key.endswith("_size") and isinstance(value, Sequence) and not isinstance(value, str):
        return " × ".join(str(v) for v in value)
    if isinstance(value, (Mapping, list, tuple)):
        return json.dumps(value, default=str) if value else "default"
    return str(value)


def _card(heading: str, facts: Mapping[str, Any]) -> str:
    items = "".join(
        f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(v))}</dd>" for k, v in facts.items()
    )
    return f'<div class="card"><h3>{html.escape(heading)}</h3><dl class="facts">{items}</dl></div>'


def _probe_section(
    scores: pd.DataFrame | None,
    note: str | None,
    predictions: pd.DataFrame | None = None,
    comparison: pd.DataFrame | None = None,
) -> str:
    if scores is None:
        return _note(note)
    if scores.empty:
        return _note("The probe table is empty.")
    html_table = probe_table_html(scores)
    if comparison is not None and len(comparison):
        html_table += "\n" + comparison_table_html(comparison)
    if predictions is not None and len(predictions) and comparison is not None:
        probed = predictions[predictions["feature_set"] == DINO]
        id_columns = ["row"] if "row" in probed.columns else ["participant_id", "session_id"]
        n_scans = len(probed.drop_duplicates(id_columns))
        caveat = judgement_caveat(comparison, n_scans)
        if caveat:
            html_table = (
                f'<p class="caveat" id="too-small">{html.escape(caveat)}</p>\n' + html_table
            )
    return html_table


def comparison_table_html(comparison: pd.DataFrame) -> str:
    """:func:`~nidl_dino.evaluation.probes.compare_to_baselines` as an HTML table with a caption."""
    rows = []
    for row in comparison.itertuples(index=False):
        verdict = "yes" if row.beats_by_spread else "no"
        cells = [
            html.escape(str(row.target)),
            html.escape(METRIC_LABELS.get(row.metric, str(row.metric))),
            html.escape(str(row.baseline)),
            format_gain(row.metric, row.gain_mean, row.gain_std),
            f"{row.wins}/{row.n_folds}",
            f'<span class="status-{"ok" if row.beats_by_spread else "excluded"}">{verdict}</span>',
        ]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    header = "".join(
        f"<th>{h}</th>"
        for h in ("target", "metric", "baseline", "gain of DINO", "folds won", "beats by spread")
    )
    caption = (
        "DINO against each baseline, fold by fold on the same test folds: gain is positive when "
        "DINO is better (mean ± standard deviation of the paired differences); 'beats by spread' "
        "when DINO's mean is better by more than the larger of the two fold spreads."
    )
    return (
        '<table class="probes" id="comparison-table">\n'
        f"<thead><tr>{header}</tr></thead>\n<tbody>{''.join(rows)}</tbody>\n</table>\n"
        f'<p class="caption">{html.escape(caption)}</p>'
    )


def _scatter_section(predictions: pd.DataFrame | None, note: str | None) -> str:
    if predictions is None:
        return _note(note)
    drawn = predicted_vs_true(predictions)
    if drawn is None:
        return _note("No regression target was probed.")
    fig, targets, legends = drawn
    n_repeats = int(predictions["repeat"].nunique()) if "repeat" in predictions.columns else 1
    caption = (
        f"Each point is a scan predicted while held out, averaged over {n_repeats} repeat(s). "
        "MAE here is that of the averaged predictions, so it differs slightly from the table's "
        "mean over folds. All feature sets: " + "; ".join(legends) + "."
    )
    return _figure(fig, f"predicted versus true {', '.join(targets)}", caption)


def _embedding_section(cohort: pd.DataFrame | None, note: str | None) -> str:
    if cohort is None:
        return _note(note)
    try:
        rows, xy, explained = pca_embedding(cohort)
    except UserError as err:
        return _note(f"No embedding: {err}")
    fig, notes = embedding_figure(rows, xy, explained)
    n_features = len(feature_names(cohort))
    caption = (
        f"PCA of the standardised features ({n_features} per scan) of the {len(rows)} scans "
        "that passed QC, first two components (PCA rather than t-SNE: deterministic, and "
        "distances between groups keep their meaning)."
    )
    return "".join(_note(n) for n in notes) + _figure(fig, "PCA embedding of the features", caption)


def _model_card_section(card_md: str | os.PathLike | None) -> str:
    if card_md is None:
        return _note("No model card in this run.")
    if not Path(card_md).is_file():
        return _note(f"No model card: {card_md} does not exist.")
    return f"<pre>{html.escape(Path(card_md).read_text(encoding='utf-8'))}</pre>"


def _curves_section(curves_png: str | os.PathLike | None) -> str:
    if curves_png is None:
        return _note("No training curves in this run.")
    if not Path(curves_png).is_file():
        return _note(f"No training curves: {curves_png} does not exist.")
    caption = "DINO loss, teacher temperature, teacher momentum and learning rate per step."
    uri = _png_uri(Path(curves_png).read_bytes())
    return (
        f'<figure class="plot"><img alt="training curves" src="{uri}">'
        f'<figcaption class="caption">{html.escape(caption)}</figcaption></figure>'
    )


def _excluded_section(qc: pd.DataFrame) -> str:
    excluded = qc[qc["status"] != "ok"]
    parts = []
    if excluded.empty:
        parts.append(_note(f"No scan was excluded ({len(qc)} scans passed QC)."))
    else:
        rows = "".join(
            f"<tr><td>{html.escape(r.scan_id)}</td>{_status_cell(r.status)}"
            f'<td class="reason">{html.escape(str(r.reason))}</td></tr>'
            for r in excluded.itertuples(index=False)
        )
        parts.append(
            f"<p>{len(excluded)} of {len(qc)} scans were excluded and have no features.</p>"
            '<table class="listing" id="excluded-table"><thead><tr><th>scan</th><th>status</th>'
            f"<th>reason</th></tr></thead><tbody>{rows}</tbody></table>"
        )
    parts.append(_qc_measures(qc))
    return "\n".join(parts)


def _qc_measures(qc: pd.DataFrame) -> str:
    """A collapsed table of the numeric ``metrics.*`` QC measures of every scan."""
    columns = [
        c
        for c in qc.columns
        if str(c).startswith("metrics.") and pd.api.types.is_numeric_dtype(qc[c])
    ]
    if not columns:
        return ""
    if len(qc) > MAX_MEASURE_ROWS:
        return _note(
            f"The QC measures of the {len(qc)} scans are in qc/qc.tsv (the page lists them up "
            f"to {MAX_MEASURE_ROWS} scans)."
        )
    head = "".join(f"<th>{html.escape(c.removeprefix('metrics.'))}</th>" for c in columns)
    body = []
    for record in qc[["scan_id", "status", *columns]].itertuples(index=False):
        cells = "".join(f"<td>{_format_number(v)}</td>" for v in record[2:])
        body.append(f"<tr><td>{html.escape(record[0])}</td>{_status_cell(record[1])}{cells}</tr>")
    return (
        f"<details><summary>QC measures of every scan ({len(qc)})</summary>"
        '<div class="scroll"><table class="listing measures"><thead><tr><th>scan</th>'
        f"<th>status</th>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div></details>"
    )


def _tile(scan: str, status: str, reason: str, picture: str) -> str:
    reason_html = f'<span class="reason">{html.escape(reason)}</span>' if reason else ""
    return (
        f'<figure class="{"ok" if status == "ok" else "excluded"}" id="qc-{html.escape(scan)}">'
        f"{picture}<figcaption>{html.escape(scan)} · "
        f'<span class="status-{html.escape(status)}">{html.escape(status)}</span>'
        f"{reason_html}</figcaption></figure>"
    )


def shown_scans(qc: pd.DataFrame) -> list[int]:
    """Rows of ``qc`` whose picture the page embeds, in QC-table order: the excluded scans
    (capped) and a sample of the others, fixed by the scan ids (a hash: reruns show the same)."""
    excluded = [i for i, s in enumerate(qc["status"]) if str(s) != "ok"][:MAX_EXCLUDED_TILES]
    ok = [i for i, s in enumerate(qc["status"]) if str(s) == "ok"]
    if len(ok) > SAMPLE_OK_TILES:
        keyed = sorted(
            ok, key=lambda i: hashlib.sha256(str(qc["scan_id"].iloc[i]).encode()).digest()
        )
        ok = sorted(keyed[:SAMPLE_OK_TILES])
    return sorted(excluded + ok)


def _montage_section(
    qc: pd.DataFrame,
    qc_pngs: Mapping[str, str | os.PathLike],
    out_html: str | os.PathLike,
    montage_dir: str | os.PathLike | None,
) -> str:
    known = set(qc["scan_id"])
    extra = [s for s in qc_pngs if s not in known]
    if extra:
        log.warning(
            "report: %d QC picture(s) of scans not in the QC table (e.g. %s) are left out",
            len(extra),
            extra[0],
        )
    rows = shown_scans(qc)
    tiles = []
    for i in rows:
        record = qc.iloc[i]
        scan, status = str(record["scan_id"]), str(record["status"])
        path = qc_pngs.get(scan)
        if path is not None and Path(path).is_file():
            picture = f'<img alt="QC of {html.escape(scan)}" src="{_png_uri(thumbnail(path))}">'
        else:
            picture = '<div class="missing">no QC picture</div>'
        tiles.append(_tile(scan, status, str(record["reason"]) if status != "ok" else "", picture))
    n_excluded = int((qc["status"] != "ok").sum())
    if len(rows) == len(qc):
        caption = (
            "Three orthogonal slices of every preprocessed scan with the template brain outline "
            "(red), in QC-table order; excluded scans are framed in red with their reason."
        )
    else:
        caption = (
            f"Three orthogonal slices with the template brain outline (red): "
            f"in QC-table order, {min(n_excluded, MAX_EXCLUDED_TILES)} of the {n_excluded} excluded scans (framed "
            f"in red with their reason), then a sample of {len(rows) - min(n_excluded, MAX_EXCLUDED_TILES)} "
            f"of the {len(qc) - n_excluded} scans that passed QC. Every scan is on the montage pages."
        )
    links = ""
    if montage_dir is not None:
        pages = write_montage_pages(qc, qc_pngs, montage_dir)
        base = Path(out_html).resolve().parent
        hrefs = [os.path.relpath(Path(page).resolve(), base) for page in pages]
        links = (
            '<p class="montage-pages">All scans: '
            + " · ".join(
                f'<a href="{html.escape(h)}">page {k + 1}</a>' for k, h in enumerate(hrefs)
            )
            + "</p>"
        )
    return (
        f'<p class="caption">{html.escape(caption)}</p>{links}'
        f'<div class="montage">{"".join(tiles)}</div>'
    )


def write_montage_pages(
    qc: pd.DataFrame,
    qc_pngs: Mapping[str, str | os.PathLike],
    montage_dir: str | os.PathLike,
) -> list[Path]:
    """The QC picture of every scan, :data:`MONTAGE_PAGE_TILES` per HTML page.

    Pictures are linked by relative path (lazy-loaded), not embedded: a page weighs a few
    hundred kB at any cohort size, and the output folder must stay together to show them.

    Returns:
        The pages written (``page-001.html`` ...), in QC-table order.
    """
    folder = Path(montage_dir)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("page-*.html"):
        old.unlink()
    n_pages = max(1, -(-len(qc) // MONTAGE_PAGE_TILES))
    pages = []
    for k in range(n_pages):
        part = qc.iloc[k * MONTAGE_PAGE_TILES : (k + 1) * MONTAGE_PAGE_TILES]
        tiles = []
        for record in part.itertuples(index=False):
            scan, status = str(record.scan_id), str(record.status)
            path = qc_pngs.get(scan)
            if path is not None:
                href = os.path.relpath(Path(path).resolve(), folder.resolve())
                picture = (
                    f'<img alt="QC of {html.escape(scan)}" loading="lazy" '
                    f'src="{html.escape(href)}">'
                )
            else:
                picture = '<div class="missing">no QC picture</div>'
            reason = str(record.reason) if status != "ok" else ""
            tiles.append(_tile(scan, status, reason, picture))
        nav = " · ".join(
            f'<a href="page-{j + 1:03d}.html">{j + 1}</a>' if j != k else f"<b>{j + 1}</b>"
            for j in range(n_pages)
        )
        page = (
            '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            '<link rel="icon" href="data:,">\n'
            f"<title>QC montage, page {k + 1} of {n_pages}</title>\n<style>{_CSS}</style>\n"
            f"</head>\n<body>\n<main>\n<h1>QC montage, page {k + 1} of {n_pages}</h1>\n"
            f'<nav>{nav}</nav>\n<div class="montage">{"".join(tiles)}</div>\n'
            "</main>\n</body>\n</html>\n"
        )
        path = folder / f"page-{k + 1:03d}.html"
        write_text_atomic(path, page)
        pages.append(path)
    return pages


# ---------------------------------------------------------------- pictures and small pieces


def _figure(fig: Any, alt: str, caption: str) -> str:
    return (
        f'<figure class="plot"><img alt="{html.escape(alt)}" src="{_png_uri(png_bytes(fig))}">'
        f'<figcaption class="caption">{html.escape(caption)}</figcaption></figure>'
    )


def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _status_cell(status: Any) -> str:
    status = html.escape(str(status))
    return f'<td class="status-{status}">{status}</td>'


def _note(text: str | None) -> str:
    return f'<p class="note">{html.escape(text or "")}</p>'


def _format_number(value: Any) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return ""
    if isinstance(value, (int, np.integer)):
        return str(value)
    return f"{float(value):.4g}"


__all__ = [
    "DINO",
    "THUMBNAIL_WIDTH",
    "comparison_table_html",
    "probe_table_html",
    "write_report",
]
