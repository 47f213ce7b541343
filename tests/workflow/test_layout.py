"""Where outputs live (nidl_dino.workflow.layout): BIDS-derivatives names, the brain mask, and no module
but the layout spelling a path below output_dir."""

from __future__ import annotations

import doctest
import io
import re
import tokenize
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from nidl_dino.errors import UserError
from nidl_dino.workflow import layout as layout_module
from nidl_dino.workflow.inputs import discover_scans
from nidl_dino.workflow.layout import Layout, res_label, scan_sources

from workflow_helpers import REPO, tiny_nifti

#: BIDS-derivatives names as fMRIPrep writes them, relative to output_dir: the source entities
#: (sub, ses, acq, run, in this order), then the derivative entities and suffix.
BIDS_DERIVATIVE = re.compile(
    r"sub-(?P<sub>[A-Za-z0-9]+)/(?:ses-(?P<ses>[A-Za-z0-9]+)/)?anat/"
    r"sub-(?P=sub)(?(ses)_ses-(?P=ses))(?:_acq-[A-Za-z0-9]+)?(?:_run-[0-9]+)?"
    r"(?:_space-[A-Za-z0-9]+_res-[A-Za-z0-9]+_desc-(?:preproc_T1w|brain_mask)\.nii\.gz"
    r"|_from-T1w_to-[A-Za-z0-9]+_mode-image_xfm\.mat)"
)


@pytest.fixture
def bids(tmp_path) -> Path:
    root = tmp_path / "bids"
    for name in (
        "sub-01/ses-1/anat/sub-01_ses-1_run-1_T1w.nii.gz",
        "sub-01/ses-1/anat/sub-01_ses-1_run-2_T1w.nii.gz",
        "sub-02/anat/sub-02_acq-mprage_T1w.nii.gz",
    ):
        tiny_nifti(root / name)
    return root


def _layout(bids: Path, out: Path, run_policy: str) -> Layout:
    scans = discover_scans({"bids_dir": str(bids), "run_policy": run_policy})
    config = {"output_dir": str(out), "preprocessing": {"resample": {"spacing_mm": 3.0}}}
    return Layout.from_config(config, scan_sources(scans))


def test_preprocessed_files_have_fmriprep_names(bids, tmp_path):
    out = tmp_path / "out"
    layout = _layout(bids, out, "all")
    # input sub-01/ses-1/anat/sub-01_ses-1_run-2_T1w.nii.gz
    files = layout.scan("sub-01_ses-1_run-2")
    keys = ("volume", "mask", "transform", "qc_json", "qc_png", "signature")
    names = {key: getattr(files, key).relative_to(out).as_posix() for key in keys}
    anat = "sub-01/ses-1/anat/sub-01_ses-1_run-2"
    assert names == {
        "volume": f"{anat}_space-MNI152NLin2009aSym_res-3_desc-preproc_T1w.nii.gz",
        "mask": f"{anat}_space-MNI152NLin2009aSym_res-3_desc-brain_mask.nii.gz",
        "transform": f"{anat}_from-T1w_to-MNI152NLin2009aSym_mode-image_xfm.mat",
        "qc_json": f"{anat}_desc-qc_T1w.json",
        "qc_png": f"{anat}_desc-qc_T1w.png",
        "signature": "sub-01/ses-1/anat/.sub-01_ses-1_run-2.nidl-dino-done.json",
    }
    # sub-02's one scan: its scan id drops acq-mprage, its files keep it (every source entity)
    assert layout.scan("sub-02").volume.relative_to(out).as_posix() == (
        "sub-02/anat/sub-02_acq-mprage_space-MNI152NLin2009aSym_res-3_desc-preproc_T1w.nii.gz"
    )
    for scan in ("sub-01_ses-1_run-1", "sub-01_ses-1_run-2", "sub-02"):
        files = layout.scan(scan)
        for path in (files.volume, files.mask, files.transform):
            assert BIDS_DERIVATIVE.fullmatch(path.relative_to(out).as_posix()), path


def test_one_run_kept_keeps_its_run_entity(bids, tmp_path):
    layout = _layout(bids, tmp_path / "out", "first")
    assert layout.scan("sub-01_ses-1").mask.relative_to(tmp_path / "out").as_posix() == (
        "sub-01/ses-1/anat/sub-01_ses-1_run-1_space-MNI152NLin2009aSym_res-3_desc-brain_mask.nii.gz"
    )
    # a layout rebuilt from a rule's params is the same layout
    assert Layout(**layout.params()).scan("sub-01_ses-1") == layout.scan("sub-01_ses-1")
    assert layout.params(["sub-02"])["sources"] == {"sub-02": "sub-02_acq-mprage"}


def test_res_is_the_grid_spacing_in_mm():
    assert [res_label(s) for s in (3, 3.0, 1.5, 0.8, 1.25, 12)] == [
        "3",
        "3",
        "1p5",
        "0p8",
        "1p25",
        "12",
    ]
    for bad in (0, -1.5, float("nan")):
        with pytest.raises(ValueError):
            res_label(bad)
    with pytest.raises(UserError, match=r"preprocessing\.resample\.spacing_mm"):
        Layout.from_config({"output_dir": "x", "preprocessing": {"resample": {"spacing_mm": 0}}})


def test_workflow_files_and_the_template_name():
    layout = Layout("out")
    assert layout.qc_tsv.as_posix() == "out/qc/qc.tsv"  # INTERFACE.md
    assert layout.feature_table("sub-01_ses-1").as_posix() == "out/features/sub-01_ses-1.tsv"
    assert layout.cohort_parquet.as_posix() == "out/features/cohort.parquet"
    assert layout.teacher.as_posix() == "out/model/teacher.pt"
    assert layout.preproc_batch("batch-0001").as_posix() == "out/preproc/batches/batch-0001.tsv"
    # the space is the template registration targets: nilearn's ICBM 2009a nonlinear symmetric
    from nidl_dino.preprocessing.template import TEMPLATE_FILE

    assert "nlin_sym_09a" in TEMPLATE_FILE[-1] and layout_module.SPACE == "MNI152NLin2009aSym"
    assert doctest.testmod(layout_module).failed == 0


def test_brain_mask_is_written_binary_on_the_volume_grid(tmp_path):
    from nidl_dino.preprocessing.phantom import scanner_affine, synthetic_scan
    from nidl_dino.preprocessing.template import BRAIN_THRESHOLD, template_on_grid
    from nidl_dino.workflow.jobs import preprocess_batch

    shape = (48, 56, 48)
    affine = scanner_affine(shape, (4.0, 4.0, 4.0), "RAS")
    affine[:3, 3] += [0.0, -17.0, 5.0]
    path = tmp_path / "sub-01_T1w.nii.gz"
    nib.save(nib.Nifti1Image(synthetic_scan(shape, affine, head_spacing_mm=4.0), affine), path)
    config = {"registration": {"enabled": False}, "resample": {"spacing_mm": 4.0}}
    layout = Layout(tmp_path / "out", 4.0)
    scan = {"scan_id": "sub-01", "path": str(path), "participant_id": "sub-01", "session_id": ""}
    [row] = preprocess_batch([scan], layout, config)
    assert row["status"] == "ok", row["reason"]

    volume = nib.load(layout.scan("sub-01").volume)
    mask = nib.load(layout.scan("sub-01").mask)
    assert mask.get_data_dtype() == np.uint8
    data = np.asarray(mask.dataobj)
    assert set(np.unique(data)) == {0, 1}
    assert mask.shape == volume.shape
    np.testing.assert_array_equal(mask.affine, volume.affine)
    assert int(mask.header["sform_code"]) == int(volume.header["sform_code"]) == 4  # MNI
    # the mask the volume was masked with: nothing outside it, the whole template brain inside
    assert not np.asarray(volume.dataobj)[data == 0].any()
    brain = template_on_grid(volume.shape, volume.affine) > BRAIN_THRESHOLD
    assert data[brain].all() and data.sum() > brain.sum()


# ------------------------------------------------------------------ nobody else spells a path

#: Pieces of paths below output_dir: the per-scan names, the folders of the workflow.
OUTPUT_PATH = re.compile(
    r"desc-(?:preproc|brain|qc)|space-|_xfm|mode-image|nidl-dino-done|_qc\.(?:json|png)"
    r"|(?:^|[/\"'}])(?:preproc|features|baselines|model|probes|logs)/|qc/qc|report/(?:report\.html|montage)"
    r"|\.cache/"
)
#: Prose for the user that names a file of the run (not a path being built).
ALLOWED = {
    ("nidl_dino/evaluation/report.py", "The QC measures of the"),
    ("nidl_dino/training/run.py", "qc/qc.tsv for the exclusion reasons"),
}


def _string_literals(text: str):
    """(line, literal) of every string literal but docstrings and lone strings."""
    tokens = [
        t
        for t in tokenize.generate_tokens(io.StringIO(text).readline)
        if t.type not in (tokenize.NL, tokenize.COMMENT)
    ]
    statement_edges = (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER)
    for i, token in enumerate(tokens):
        if token.type != tokenize.STRING:
            continue
        before = tokens[i - 1].type if i else tokenize.NEWLINE
        after = tokens[i + 1].type if i + 1 < len(tokens) else tokenize.ENDMARKER
        if before in statement_edges and after in statement_edges:
            continue  # a docstring
        yield token.start[0], token.string


def _offenders(path: Path, text: str) -> list[str]:
    where = path.relative_to(REPO).as_posix() if path.is_absolute() else str(path)
    return [
        f"{where}:{line}: {literal}"
        for line, literal in _string_literals(text)
        if OUTPUT_PATH.search(literal) and not any(w == where and a in literal for w, a in ALLOWED)
    ]


def test_the_scanner_finds_a_hand_built_path():
    code = 'def f(out, s):\n    """preproc/ in a docstring is fine."""\n'
    code += '    return f"{out}/preproc/{s}/{s}_desc-preproc_T1w.nii.gz", out + "/qc/qc.tsv"\n'
    assert len(_offenders(Path("x.py"), code)) == 2


def test_no_module_but_the_layout_builds_output_paths():
    sources = [
        *sorted((REPO / "nidl_dino").rglob("*.py")),
        *sorted((REPO / "pipeline").rglob("*.py")),
        *sorted((REPO / "pipeline" / "rules").glob("*.smk")),
        REPO / "Snakefile",
    ]
    assert len(sources) > 40
    offenders = [
        line
        for path in sources
        if path != REPO / "nidl_dino" / "workflow" / "layout.py"
        for line in _offenders(path, path.read_text(encoding="utf-8"))
    ]
    assert offenders == [], "\n".join(offenders)
