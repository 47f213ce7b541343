"""A trained teacher as an artifact: what it expects, which scans trained it, and its model card.

The ``model:`` section of config.yaml chooses between training here (``teacher: null``) and
applying a teacher trained elsewhere (``teacher: path/to/teacher.pt``). A teacher saved by this
version records, in its ``extra["card"]``, the preprocessing its training volumes went through
(:func:`expected_preprocessing`), the training configuration, the number and a hash of the
training scans, software versions, the final loss and the collapse monitors. Applying a teacher
checks that record against this run's ``preprocessing:`` section before any job runs
(:func:`check_preprocessing`); a teacher saved before this record existed is accepted with a
warning (its preprocessing cannot be checked: re-train to get one).

Command line::

    python -m nidl_dino.model show results/demo/model/teacher.pt   # or a model_card.json
    python -m nidl_dino.model show --json PATH
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from nidl_dino.atomic import write_text_atomic
from nidl_dino.errors import UserError
from nidl_dino.workflow.layout import SPACE, Layout, card_beside

#: Format of the model card JSON.
CARD_FORMAT = "nidl-dino-model-card/1"
#: The template our registration targets: nilearn's MNI152 (ICBM 2009a, nonlinear, symmetric).
TEMPLATE = SPACE
#: Packages whose versions the card records.
CARD_PACKAGES = (
    "nidl-dino",
    "torch",
    "pytorch-lightning",
    "monai",
    "numpy",
    "nibabel",
    "antspyx",
    "nilearn",
)

# The preprocessing knobs a teacher depends on: (dotted key below preprocessing, default).
# Change any of them and the volumes differ in grid, space or intensity scale from those the
# teacher saw; the rest (N4 iterations, QC thresholds, validation) do not change what a
# kept volume looks like enough to forbid reuse.
_CONTRACT_KEYS: tuple[tuple[str, Any], ...] = (
    ("registration.enabled", True),
    ("resample.spacing_mm", 1.5),
    ("resample.fov_mm", [192.0, 192.0, 192.0]),
    ("resample.center_mm", [0.0, -17.0, 5.0]),
    ("normalization.method", "percentile"),
    ("normalization.percentiles", [0.5, 99.5]),
    ("mask.enabled", True),
    ("mask.keep_head", False),
    ("mask.dilation_mm", 4.0),
    ("bias_correction.enabled", True),
)


# ----------------------------------------------------------------------------- preprocessing
def _get(mapping: Mapping[str, Any] | None, dotted: str, default: Any) -> Any:
    node: Any = mapping or {}
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def _plain(value: Any) -> Any:
    """Numbers as floats where the schema allows both (4 and 4.0 are the same grid)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def expected_preprocessing(preprocessing: Mapping[str, Any] | None) -> dict[str, Any]:
    """What a volume must have gone through to be fed to a teacher trained on this config.

    Args:
        preprocessing: the ``preprocessing:`` section (missing keys take the defaults).

    Returns:
        ``{"template": ..., "<dotted key>": value, ...}`` with plain JSON values.
    """
    contract: dict[str, Any] = {"template": TEMPLATE}
    for key, default in _CONTRACT_KEYS:
        contract[key] = _plain(_get(preprocessing, key, default))
    return contract


def check_preprocessing(
    expected: Mapping[str, Any] | None,
    preprocessing: Mapping[str, Any] | None,
    teacher_path: str | os.PathLike,
) -> list[str]:
    """Check this run's preprocessing against the one a teacher was trained on.

    Returns:
        Warnings (a teacher that records no preprocessing cannot be checked).

    Raises:
        UserError: the first difference, naming the key and both values.
    """
    if not expected:
        return [
            f"model.teacher {teacher_path} records no preprocessing (saved before model cards): "
            "its compatibility with this run is not checked; re-train it to get one"
        ]
    ours = expected_preprocessing(preprocessing)
    for key, value in expected.items():
        if key not in ours:
            continue  # a knob this version does not know
        if ours[key] != value:
            where = "the template" if key == "template" else f"preprocessing.{key}"
            raise UserError(
                f"model.teacher {teacher_path} was trained on {where} = {json.dumps(value)} but "
                f"this run has {json.dumps(ours[key])}: set {where} to {json.dumps(value)} "
                "(or train a new model with model.teacher: null)"
            )
    return []


# ----------------------------------------------------------------------------- the teacher file
def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_teacher(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a teacher file, checked: ours, loadable weights-only, weights intact.

    Returns:
        The file's entries but the state dict, plus ``weights_sha256``.

    Raises:
        UserError: missing, not a teacher of ours, unreadable or damaged; one line.
    """
    import torch

    from nidl_dino.features.teacher import TEACHER_FORMAT, weights_digest

    path = Path(path)
    if not path.is_file():
        raise UserError(f"model.teacher {path} does not exist: give the path of a teacher.pt")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not our file"
        # torch's own message is a paragraph about weights_only: the exception's type says it
        raise UserError(
            f"model.teacher {path} is damaged or not a nidl-dino teacher (not loadable as a "
            f"weights-only PyTorch file: {type(exc).__name__}): "
            "give the teacher.pt written by a nidl-dino training run"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != TEACHER_FORMAT:
        raise UserError(
            f"model.teacher {path} is not a nidl-dino teacher file: give the teacher.pt written "
            "by a nidl-dino training run"
        )
    state = payload.get("state_dict")
    model_id = str(payload.get("model_id", ""))
    try:
        digest = weights_digest(state)
    except Exception:  # noqa: BLE001 - anything but a mapping of tensors is damage
        digest = ""
    if not digest or not model_id.endswith(digest[:12]):
        raise UserError(
            f"model.teacher {path} is damaged: its weights do not match its model id {model_id!r}; "
            "copy the file again from its training run"
        )
    info = {k: v for k, v in payload.items() if k != "state_dict"}
    info["weights_sha256"] = digest
    return info


# ----------------------------------------------------------------------------- model cards
def software_versions() -> dict[str, str]:
    """Python and the versions of :data:`CARD_PACKAGES` that are installed."""
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for name in CARD_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def ids_sha256(scan_ids: Sequence[str]) -> str:
    """SHA-256 of the sorted scan ids, one per line: which scans trained a model."""
    return hashlib.sha256("\n".join(sorted(map(str, scan_ids))).encode()).hexdigest()


def training_card(
    config: Mapping[str, Any],
    scan_ids: Sequence[str],
    summary: Mapping[str, Any],
    monitors: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """The part of the model card known when training ends (saved into the teacher file).

    Args:
        config: the workflow configuration (``encoder``, ``views``, ``dino``, ``trainer``,
            ``data``, ``seed``, ``preprocessing``).
        scan_ids: the training scans.
        summary: the training summary (steps, epochs, final loss).
        monitors: last values of the logged training metrics (loss, collapse monitors).
    """
    trainer = dict(config.get("trainer") or {})
    return {
        "n_training_scans": len(scan_ids),
        "training_scans_sha256": ids_sha256(scan_ids),
        "train_on": (config.get("model") or {}).get("train_on"),
        "configuration": {
            "encoder": config.get("encoder"),
            "views": config.get("views"),
            "dino": config.get("dino"),
            "trainer": trainer,
            "batch_size": (config.get("data") or {}).get("batch_size"),
            "seed": config.get("seed"),
        },
        "preprocessing": expected_preprocessing(config.get("preprocessing")),
        "software": software_versions(),
        "training": {
            "epochs": summary.get("epochs"),
            "global_step": summary.get("global_step"),
            "final_loss": summary.get("final_loss"),
            "monitors": dict(monitors or {}),
        },
    }


def model_card(
    teacher_path: str | os.PathLike, probe_scores: Any = None, info: Mapping | None = None
) -> dict[str, Any]:
    """The full model card of a teacher file: its recorded card, ids, hashes and probe scores.

    Args:
        teacher_path: a teacher.pt.
        probe_scores: probe scores (a DataFrame of probes/scores.tsv) of the DINO features, or
            None when not available.
        info: :func:`read_teacher`'s result, when already read.
    """
    info = dict(info or read_teacher(teacher_path))
    recorded = dict((info.get("extra") or {}).get("card") or {})
    card: dict[str, Any] = {
        "format": CARD_FORMAT,
        "model_id": info.get("model_id"),
        "teacher_file": str(Path(teacher_path).resolve()),
        "weights_sha256": info.get("weights_sha256"),
        "file_sha256": file_sha256(teacher_path),
        "encoder": info.get("encoder"),
        "output_dim": info.get("output_dim"),
        "view_sizes": info.get("image_size"),
    }
    if not recorded:
        card["note"] = "saved before model cards: training details and preprocessing unknown"
    card.update(recorded)
    card["probe_scores"] = _dino_scores(probe_scores)
    return card


def _dino_scores(scores: Any) -> list[dict[str, Any]] | None:
    if scores is None or not len(scores):
        return None
    rows = scores[scores["feature_set"] == "dino"] if "feature_set" in scores else scores
    keep = [c for c in ("target", "metric", "mean", "std", "n_samples") if c in rows]
    return json.loads(rows[keep].to_json(orient="records"))


def card_markdown(card: Mapping[str, Any]) -> str:
    """A short Markdown rendering of a model card."""
    training = card.get("training") or {}
    lines = [
        f"# Model card: {card.get('model_id')}",
        "",
        f"- teacher file: `{card.get('teacher_file')}`",
        f"- weights SHA-256: `{card.get('weights_sha256')}`",
        f"- encoder: `{json.dumps(card.get('encoder'))}` ({card.get('output_dim')} outputs)",
    ]
    if card.get("note"):
        lines.append(f"- note: {card['note']}")
    if "n_training_scans" in card:
        lines += [
            f"- training scans: {card['n_training_scans']} "
            f"(ids SHA-256 `{str(card.get('training_scans_sha256'))[:16]}...`)",
            f"- train_on: `{json.dumps(card.get('train_on'))}`",
            f"- epochs: {training.get('epochs')}, steps: {training.get('global_step')}, "
            f"final loss: {_fmt(training.get('final_loss'))}",
        ]
        monitors = training.get("monitors") or {}
        if monitors:
            lines.append(
                "- last monitors: "
                + ", ".join(f"{k} {_fmt(v)}" for k, v in sorted(monitors.items()))
            )
    if card.get("preprocessing"):
        lines += ["", "## Preprocessing it expects", ""]
        lines += [f"- {k}: `{json.dumps(v)}`" for k, v in card["preprocessing"].items()]
    if card.get("configuration"):
        lines += ["", "## Training configuration", ""]
        lines += [f"- {k}: `{json.dumps(v)}`" for k, v in card["configuration"].items()]
    if card.get("software"):
        lines += ["", "## Software", ""]
        lines += [f"- {k} {v}" for k, v in card["software"].items()]
    lines += ["", "## Probe scores (DINO features)", ""]
    scores = card.get("probe_scores")
    if scores:
        lines += ["| target | metric | mean | std |", "|---|---|---|---|"]
        lines += [
            f"| {s.get('target')} | {s.get('metric')} | {_fmt(s.get('mean'))} | "
            f"{_fmt(s.get('std'))} |"
            for s in scores
        ]
    else:
        lines.append("not available")
    return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    try:
        return f"{float(value):.4g}"
    except (TypeError, ValueError):
        return str(value)


def write_card(card: Mapping[str, Any], json_path: str | os.PathLike, md_path: str | os.PathLike):
    """Write the card as JSON and Markdown (atomically)."""
    for path, text in (
        (Path(json_path), json.dumps(card, indent=2, default=str) + "\n"),
        (Path(md_path), card_markdown(card)),
    ):
        write_text_atomic(path, text)


def load_card(path: str | os.PathLike) -> dict[str, Any]:
    """A model card from its JSON, or from a teacher file (the JSON beside it when there is one).

    Raises:
        UserError: not a card nor a teacher of ours.
    """
    path = Path(path)
    if path.suffix == ".json":
        try:
            card = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UserError(f"{path} is not a readable model card ({exc}): give its path") from None
        if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
            raise UserError(f"{path} is not a nidl-dino model card: give a model_card.json")
        return card
    beside = card_beside(path)
    if path.is_file() and beside.is_file():
        card = load_card(beside)
        if card.get("file_sha256") == file_sha256(path):
            return card
    return model_card(path)


# ----------------------------------------------------------------------------- the workflow
def select_training_scans(
    scans: Any, train_on: Any, participants: Any = None, participants_file: Any = None
) -> list[str]:
    """Scan ids whose participant matches ``model.train_on``.

    Args:
        scans: the scan list (``scan_id``, ``participant_id``).
        train_on: None (every scan), a list of participant labels (``01`` or ``sub-01``), or
            participants.tsv column -> accepted values (a value or a list; compared as text).
        participants: participants.tsv as read by
            :func:`nidl_dino.workflow.participants.read_participants` (needed for column filters).
        participants_file: its path, for messages.

    Raises:
        UserError: a column filter without participants.tsv, an unknown column, or no scan left.
    """
    from nidl_dino.workflow.participants import normalise_participant_id

    ids = list(scans["scan_id"])
    if train_on is None or train_on == [] or train_on == {}:
        return ids
    if isinstance(train_on, (str, int)):
        train_on = [train_on]
    if isinstance(train_on, list):
        wanted = {normalise_participant_id(v) for v in train_on}
        keep = scans["participant_id"].map(normalise_participant_id).isin(wanted)
        what = f"the labels {sorted(wanted)[:5]}"
    else:
        if participants is None:
            raise UserError(
                "model.train_on filters participants.tsv columns but there is no participants.tsv: "
                "add one, or give a list of labels"
            )
        rows = participants
        for column, accepted in train_on.items():
            if column not in rows.columns:
                raise UserError(
                    f"model.train_on: {participants_file} has no column '{column}': use one of "
                    f"{', '.join(map(str, participants.columns[1:]))}"
                )
            accepted = accepted if isinstance(accepted, list) else [accepted]
            text = {_as_text(v) for v in accepted}
            rows = rows[rows[column].map(_as_text).isin(text)]
        keep = (
            scans["participant_id"].map(normalise_participant_id).isin(set(rows["participant_id"]))
        )
        what = f"the filter {json.dumps(train_on, default=str)}"
    selected = [s for s, k in zip(ids, keep, strict=True) if k]
    if not selected:
        raise UserError(
            f"model.train_on selects no scan to train on ({what} selects none of the {len(ids)} scans): "
            "fix model.train_on"
        )
    return selected


def _as_text(value: Any) -> str:
    """A cell or filter value as text: 1, 1.0 and '1' agree; missing values are ''."""
    try:
        import pandas as pd

        if value is None or (not isinstance(value, str) and pd.isna(value)):
            return ""
    except (TypeError, ValueError):
        pass
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def resolve_model(config: Mapping[str, Any], scans: Any, check: bool = True) -> dict[str, Any]:
    """What the Snakefile needs from the ``model:`` section, checked before any job.

    Returns:
        ``{"teacher": path or None, "train_scans": scan ids or None, "model_id": ...}``:
        ``teacher`` is the given teacher (no training job), ``train_scans`` the scans to train
        on (None: every scan that passes QC).

    Raises:
        UserError: a missing, foreign, damaged or incompatible teacher; a ``train_on`` that
            selects no scan.
    """
    section = dict(config.get("model") or {})
    teacher = section.get("teacher")
    train_on = section.get("train_on")
    if teacher:
        path = Path(str(teacher)).expanduser().resolve()
        result: dict[str, Any] = {"teacher": str(path), "train_scans": None}
        if train_on not in (None, [], {}):
            print(
                "nidl-dino: warning: model.train_on is ignored: model.teacher is given, "
                "nothing is trained",
                file=sys.stderr,
            )
        if check:
            info = read_teacher(path)
            expected = ((info.get("extra") or {}).get("card") or {}).get("preprocessing")
            for warning in check_preprocessing(expected, config.get("preprocessing"), path):
                print(f"nidl-dino: warning: {warning}", file=sys.stderr)
            result["model_id"] = info.get("model_id")
        return result
    if train_on in (None, [], {}):
        return {"teacher": None, "train_scans": None}
    participants = participants_file = None
    if isinstance(train_on, Mapping):
        from nidl_dino.workflow.inputs import participants_tsv_path
        from nidl_dino.workflow.participants import read_participants

        participants_file = participants_tsv_path(config)
        if participants_file is not None:
            participants = read_participants(participants_file)
    selected = select_training_scans(scans, train_on, participants, participants_file)
    return {"teacher": None, "train_scans": selected}


def training_scan_volumes(qc: Any, layout: Layout, train_scans: Sequence[str] | None):
    """Preprocessed volumes of the scans that passed QC, limited to ``train_scans`` if given.

    Returns:
        The volumes (paths of ``layout``) and their scan ids, in QC-table order.
    """
    from nidl_dino.workflow.tables import ok_scans

    ok = ok_scans(qc)
    if train_scans is not None:
        ok = ok[ok["scan_id"].isin(set(train_scans))]
    ids = list(ok["scan_id"])
    return [str(layout.scan(s).volume) for s in ids], ids


# ----------------------------------------------------------------------------- command line
def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m nidl_dino.model", description="Inspect a trained nidl-dino model."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    show = sub.add_parser("show", help="print the model card of a teacher.pt or model_card.json")
    show.add_argument("path")
    show.add_argument("--json", action="store_true", help="print the JSON instead of Markdown")
    args = parser.parse_args(argv)
    try:
        card = load_card(args.path)
    except UserError as err:
        print(f"nidl-dino: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(card, indent=2, default=str) if args.json else card_markdown(card), end="")
    if args.json:
        print()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
