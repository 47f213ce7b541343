"""Quality control: measures, automatic exclusion flags and the QC picture.

Every measure goes into the QC record; a measure outside its configured range becomes a flag,
and a flagged scan is excluded with the flags as its reason (never silently kept).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from scipy import ndimage

from nidl_dino.atomic import atomic_path
from nidl_dino.preprocessing.resample import inside_fov, resample_to_grid
from nidl_dino.preprocessing.template import BRAIN_THRESHOLD, template_at, template_on_grid


def similarity_to_template(
    data: np.ndarray,
    affine: np.ndarray,
    template_to_subject: np.ndarray,
    working_spacing_mm: float,
) -> float:
    """Correlation between the registered subject and the template, inside the brain.

    Pearson's correlation after a robust standardisation of the subject (clipped to its own
    2nd-98th percentiles inside the mask, :func:`robust_standardise`: bright vessels or fat
    weigh no more than brain), the similarity :func:`local_optimum` probes.

    Measured at working resolution (where noise is averaged out) over the template brain mask
    (template > 0.2) within the subject's field of view (a cut-off brain is the separate
    ``outside_fov_fraction``), where both images are T1-weighted brain. About 0.8-0.95 for a
    good registration of a T1w head; low or negative for a failed registration or another
    contrast.

    Args:
        data: subject array of shape (X, Y, Z) at working resolution (bias-corrected).
        affine: its 4x4 affine (subject RAS+ mm).
        template_to_subject: 4x4 world matrix from template to subject RAS+ mm.
        working_spacing_mm: resolution of the template to compare with (mm).

    Returns:
        The correlation in [-1, 1]; 0 when the subject is constant inside the mask or the brain
        maps entirely outside the image.
    """
    tpl, tpl_affine = template_at(working_spacing_mm)
    moved = resample_to_grid(data, affine, tpl.shape, tpl_affine, template_to_subject, order=1)
    inside = (tpl > BRAIN_THRESHOLD) & inside_fov(
        tpl.shape, tpl_affine, data.shape, affine, template_to_subject
    )
    if np.count_nonzero(inside) < 2:
        return 0.0
    x = robust_standardise(moved[inside].astype(np.float64))
    y = tpl[inside].astype(np.float64)
    x -= x.mean()
    y -= y.mean()
    denominator = float(np.sqrt((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / denominator) if denominator > 0 else 0.0


def _moved_in_brain(data, affine, template_to_subject, working_spacing_mm, head=None):
    """Subject and template values inside the template brain within the field of view."""
    tpl, tpl_affine = template_at(working_spacing_mm)
    moved = resample_to_grid(data, affine, tpl.shape, tpl_affine, template_to_subject, order=1)
    inside = (tpl > BRAIN_THRESHOLD) & inside_fov(
        tpl.shape, tpl_affine, data.shape, affine, template_to_subject
    )
    in_head = None
    if head is not None:
        mapped = resample_to_grid(
            head.astype(np.float32), affine, tpl.shape, tpl_affine, template_to_subject, order=1
        )
        in_head = mapped[inside] > 0.5
    return moved[inside].astype(np.float64), tpl[inside].astype(np.float64), in_head


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    if x.size < 2:
        return 0.0
    x = x - x.mean()
    y = y - y.mean()
    denominator = float(np.sqrt((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / denominator) if denominator > 0 else 0.0


def robust_standardise(values: np.ndarray, percentiles=(2.0, 98.0)) -> np.ndarray:
    """Clip values to their own percentiles (2nd-98th by default): outliers weigh no more."""
    if values.size == 0:
        return values
    lo, hi = np.percentile(values, percentiles)
    return np.clip(values, lo, hi)


def normalised_mutual_information(x: np.ndarray, y: np.ndarray, bins: int = 32) -> float:
    """Studholme's NMI ``(H(X) + H(Y)) / H(X, Y)``: 1 for independent, 2 for identical."""
    if x.size < 2:
        return 1.0
    joint, _, _ = np.histogram2d(x, y, bins=bins)
    joint /= joint.sum()

    def entropy(p):
        p = p[p > 0]
        return float(-(p * np.log(p)).sum())

    h_xy = entropy(joint)
    return (entropy(joint.sum(axis=1)) + entropy(joint.sum(axis=0))) / h_xy if h_xy > 0 else 1.0


def qc_measures(
    data: np.ndarray,
    affine: np.ndarray,
    head: np.ndarray,
    template_to_subject: np.ndarray,
    cfg: dict[str, Any],
) -> dict[str, float]:
    """Candidate registration QC measures (the calibration benchmark compares them by ROC).

    Args:
        data: working-resolution subject image (bias-corrected), shape (X, Y, Z).
        affine: its 4x4 affine (subject RAS+ mm).
        head: boolean head foreground of ``data``.
        template_to_subject: 4x4 world matrix, template to subject RAS+ mm.
        cfg: the merged preprocessing config (``working_spacing_mm``).

    Returns:
        ``pearson`` (correlation inside the template brain), ``robust`` (the same after
        :func:`robust_standardise` of the subject), ``nmi`` (:func:`normalised_mutual_information`)
        and ``overlap`` (fraction of the template brain inside the subject's head foreground).
    """
    x, y, in_head = _moved_in_brain(
        data, affine, template_to_subject, float(cfg["working_spacing_mm"]), head
    )
    return {
        "pearson": _pearson(x, y),
        "robust": _pearson(robust_standardise(x), y),
        "nmi": normalised_mutual_information(x, y),
        "overlap": float(in_head.mean()) if in_head is not None and in_head.size else 0.0,
    }


#: Pivot of the local-optimum probes (MNI mm): the template brain's centre, so that a probe
#: rotation moves the brain's edge by about 1 mm per degree and barely shifts its centre.
BRAIN_CENTRE_MM = (0.0, -18.0, 10.0)


#: Axis flips (y, z) and swaps (xy, xz, yz) probed by :func:`local_optimum`.
MIRRORS = (
    np.diag([1.0, -1.0, 1.0]),
    np.diag([1.0, 1.0, -1.0]),
    np.array([[0.0, 1, 0], [1, 0, 0], [0, 0, 1]]),
    np.array([[0.0, 0, 1], [0, 1, 0], [1, 0, 0]]),
    np.array([[1.0, 0, 0], [0, 0, 1], [0, 1, 0]]),
)


def _probe(kind: str, axis: int, step: float) -> np.ndarray:
    """A template-space 4x4 step about :data:`BRAIN_CENTRE_MM`: rotation (deg), shift (mm) or
    scale (fraction) along one axis."""
    linear, shift = np.eye(3), np.zeros(3)
    if kind == "rotation":
        a = np.deg2rad(step)
        i, j = [k for k in range(3) if k != axis]
        linear[i, i] = linear[j, j] = np.cos(a)
        linear[i, j], linear[j, i] = -np.sin(a), np.sin(a)
    elif kind == "shift":
        shift[axis] = step
    else:
        linear[axis, axis] = 1.0 + step
    centre = np.asarray(BRAIN_CENTRE_MM)
    p = np.eye(4)
    p[:3, :3] = linear
    p[:3, 3] = centre - linear @ centre + shift
    return p


def local_optimum(
    data: np.ndarray,
    affine: np.ndarray,
    template_to_subject: np.ndarray,
    working_spacing_mm: float,
    steps: dict[str, float] | None = None,
) -> dict[str, float]:
    """Is the found transform a local maximum of the similarity to the template?

    A converged registration sits at (or within a degree or a millimetre of) the maximum of the
    similarity; a wrong one (off by 5-10 degrees, 5-10 mm or 10-15 %) has a neighbour that is
    clearly better. The similarity (Pearson correlation with the template inside its brain
    mask, the subject clipped to its own 2nd-98th percentiles there) is evaluated at the
    transform and at one step either way along 9 parameters (rotation about x, y, z; shift
    along x, y, z; scale along x, y, z; template space, about :data:`BRAIN_CENTRE_MM`): 19
    evaluations, plus 5 with an axis flipped (y, z) or two axes swapped: 24 evaluations of
    about 30,000 voxels at 4 mm, about 0.1 s.

    Per parameter, a parabola through (-step, 0, +step) estimates where the maximum lies; the
    estimates are summed per kind (Euclidean norm for the rotation (deg) and the shift (mm),
    the largest scale (%)). Where the similarity is not concave along a parameter the
    parabola has no maximum: the estimate is then ``2 x step`` towards the better side
    (outside the probed range, which is what the check needs to know).

    Args:
        data: subject array (X, Y, Z) at working resolution (bias-corrected).
        affine: its 4x4 affine (subject RAS+ mm).
        template_to_subject: 4x4 world matrix, template to subject RAS+ mm.
        working_spacing_mm: resolution of the template compared with (mm).
        steps: ``rotation_deg``, ``shift_mm``, ``scale`` (fraction); default 3 deg, 3 mm, 5 %.

    Returns:
        ``similarity`` (at the transform), ``gain`` (best neighbour, a step or a flip or
        swap, minus it), ``mirror_gain`` (best flip or swap minus it; about -0.4 for a good
        registration), and the estimated distance to the maximum: ``offset_deg``,
        ``offset_mm``, ``offset_pct``.
    """
    steps = {"rotation_deg": 3.0, "shift_mm": 3.0, "scale": 0.05, **(steps or {})}
    tpl, tpl_affine = template_at(working_spacing_mm)
    inside = (tpl > BRAIN_THRESHOLD) & inside_fov(
        tpl.shape, tpl_affine, data.shape, affine, template_to_subject
    )
    ijk = np.argwhere(inside)
    if len(ijk) < 100:
        return {"similarity": 0.0, "gain": 0.0, "mirror_gain": 0.0, "offset_deg": 0.0,
                "offset_mm": 0.0, "offset_pct": 0.0}  # fmt: skip
    points = np.c_[ijk, np.ones(len(ijk))] @ tpl_affine.T  # template world, homogeneous
    y = tpl[inside].astype(np.float64)
    to_voxels = np.linalg.inv(affine) @ template_to_subject
    source = np.asarray(data, dtype=np.float32)

    def similarity(p: np.ndarray) -> float:
        coords = (points @ (to_voxels @ p).T)[:, :3].T
        x = ndimage.map_coordinates(source, coords, order=1, mode="nearest", prefilter=False)
        return _pearson(robust_standardise(x.astype(np.float64)), y)

    s0 = similarity(np.eye(4))
    best, offsets = s0, {"rotation": [], "shift": [], "scale": []}
    units = {
        "rotation": ("rotation_deg", 1.0),
        "shift": ("shift_mm", 1.0),
        "scale": ("scale", 100.0),
    }
    for kind, (key, unit) in units.items():
        h = float(steps[key])
        for axis in range(3):
            plus, minus = similarity(_probe(kind, axis, h)), similarity(_probe(kind, axis, -h))
            best = max(best, plus, minus)
            curvature = plus + minus - 2.0 * s0
            if curvature < 0:
                offset = h * (plus - minus) / (-2.0 * curvature)
                offset = float(np.clip(offset, -2.0 * h, 2.0 * h))
            else:
                offset = 2.0 * h * (1.0 if plus >= minus else -1.0)
            offsets[kind].append(offset * unit)
    # Gross failures: an axis flipped (y, z) or two axes swapped is a local optimum of its own,
    # but flipping or swapping it back improves the similarity by far (a left-right flip is not
    # probed: a brain is nearly symmetric, no image measure can see it).
    centre = np.asarray(BRAIN_CENTRE_MM)
    mirrored = -np.inf
    for linear in MIRRORS:
        p = np.eye(4)
        p[:3, :3] = linear
        p[:3, 3] = centre - linear @ centre
        mirrored = max(mirrored, similarity(p))
    return {
        "similarity": s0,
        "gain": max(best, mirrored) - s0,
        "mirror_gain": mirrored - s0,
        "offset_deg": float(np.linalg.norm(offsets["rotation"])),
        "offset_mm": float(np.linalg.norm(offsets["shift"])),
        "offset_pct": float(np.max(np.abs(offsets["scale"]))),
    }


def intensity_stats(data: np.ndarray, mask: np.ndarray) -> dict[str, float | None]:
    """Intensity statistics inside a mask: percentiles 1/50/99, mean, std, min, max, p99/p50.

    ``p99_over_p50`` is None when the median is not positive (ratio undefined).
    """
    values = np.asarray(data[mask], dtype=np.float64)
    if values.size == 0:
        return {"p1": None, "p50": None, "p99": None, "mean": None, "std": None,
                "min": None, "max": None, "p99_over_p50": None}  # fmt: skip
    p1, p50, p99 = (float(v) for v in np.percentile(values, [1, 50, 99]))
    stats = {
        "p1": p1,
        "p50": p50,
        "p99": p99,
        "mean": float(values.mean()),
        "std": float(values.std()),
        "min": float(values.min()),
        "max": float(values.max()),
        "p99_over_p50": p99 / p50 if p50 > 0 else None,
    }
    return {key: None if v is None else float(f"{v:.6g}") for key, v in stats.items()}


def _outside(value: float, bounds: list[float] | None) -> bool:
    return bounds is not None and not float(bounds[0]) <= value <= float(bounds[1])


def foreground_flag(fraction: float, qc: dict[str, Any]) -> str | None:
    """The flag for a head foreground fraction outside ``qc.foreground_fraction``, else None."""
    bounds = qc["foreground_fraction"]
    if _outside(fraction, bounds):
        return f"foreground fraction {fraction:.3f} outside {bounds[0]:g}-{bounds[1]:g}"
    return None


def qc_flags(metrics: dict[str, Any], qc: dict[str, Any]) -> list[str]:
    """Reasons to exclude a processed scan, one short sentence each; empty when it passes.

    Args:
        metrics: the record's ``metrics`` (``registration_similarity``,
            ``registration_optimum`` from :func:`local_optimum` (optional),
            ``outside_fov_fraction``, ``intensity`` stats inside the brain).
        qc: the ``qc`` config section; a None threshold is not checked.
    """
    flags = []
    similarity = metrics["registration_similarity"]
    if qc["min_similarity"] is not None and similarity < float(qc["min_similarity"]):
        flags.append(
            f"registration similarity {similarity:.2f} below threshold {qc['min_similarity']:g}"
        )
    optimum = metrics.get("registration_optimum")
    if optimum is not None:
        gain = qc["max_optimum_gain"]
        mirror = optimum.get("mirror_gain", -1.0)
        if gain is not None and mirror > float(gain):
            flags.append(
                f"registration has an axis flipped or swapped: undoing it improves the "
                f"similarity by {mirror:.3f} (allowed {gain:g})"
            )
        elif gain is not None and optimum["gain"] > float(gain):
            flags.append(
                f"registration not at the similarity maximum: a small step improves it by "
                f"{optimum['gain']:.3f} (allowed {gain:g})"
            )
        limits = qc["max_optimum_offset"]
        if limits is not None:
            found = [
                f"{optimum[key]:.1f} {unit}"
                for key, unit in (("offset_deg", "deg"), ("offset_mm", "mm"), ("offset_pct", "%"))
                if limits[f"{key[7:]}"] is not None and optimum[key] > float(limits[key[7:]])
            ]
            if found:
                allowed = ", ".join(
                    f"{limits[k]:g} {u}"
                    for k, u in (("deg", "deg"), ("mm", "mm"), ("pct", "%"))
                    if limits[k] is not None
                )
                flags.append(
                    f"registration off the similarity maximum by about {', '.join(found)} "
                    f"(allowed {allowed})"
                )
    outside, limit = metrics["outside_fov_fraction"], qc["max_outside_fov_fraction"]
    if limit is not None and outside > float(limit):
        flags.append(
            f"{100 * outside:.0f}% of the brain mask is outside the field of view "
            f"(allowed {100 * float(limit):g}%)"
        )
    bounds = qc["intensity_p99_over_p50"]
    if bounds is not None:
        ratio = metrics["intensity"]["p99_over_p50"]
        if ratio is None:
            flags.append("extreme intensity statistics: in-brain median intensity is not positive")
        elif _outside(ratio, bounds):
            flags.append(
                f"extreme intensity statistics: in-brain p99/p50 {ratio:.2f} "
                f"(allowed {bounds[0]:g}-{bounds[1]:g})"
            )
    return flags


def save_qc_png(
    path: str | os.PathLike,
    volume: np.ndarray,
    grid_affine: np.ndarray,
    title: str,
    note: str = "",
) -> None:
    """Three orthogonal slices through the grid centre with the template brain outline (red).

    Neurological convention: the subject's right is on the right of the coronal and axial
    views; anterior is up (axial) and to the right (sagittal). The slices and the outline are
    composed into one RGB image (one matplotlib image, no contour tracing: the picture costs
    a few tens of ms). Written atomically.

    Args:
        path: the PNG file.
        volume: array on the output grid, shape (X, Y, Z), RAS+ axes.
        grid_affine: 4x4 grid affine (MNI RAS+ mm).
        title: first line above the slices (e.g. the scan's name and status).
        note: second line (e.g. the exclusion reason), in red when given.
    """
    from matplotlib.figure import Figure

    brain = template_on_grid(volume.shape, grid_affine) > BRAIN_THRESHOLD
    nonzero = volume[volume != 0]
    vmin, vmax = (float(v) for v in np.percentile(nonzero, [0.5, 99.5])) if nonzero.size else (0, 1)
    gray = np.clip((volume - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
    cx, cy, cz = (n // 2 for n in volume.shape)
    # (image, outline) per view, transposed and flipped so that rows go from top to bottom.
    views = [(gray[cx], brain[cx]), (gray[:, cy], brain[:, cy]), (gray[:, :, cz], brain[:, :, cz])]
    height = max(v.shape[1] for v, _ in views)
    gap = np.zeros((height, 4, 3))
    panels = []
    for image, inside in views:
        edge = inside & ~ndimage.binary_erosion(inside)
        rgb = np.repeat(image.T[::-1, :, None], 3, axis=2)
        rgb[edge.T[::-1]] = (1.0, 0.0, 0.0)
        padded = np.zeros((height, rgb.shape[1], 3))
        padded[height - rgb.shape[0] :] = rgb
        panels += [padded, gap]
    composite = np.concatenate(panels[:-1], axis=1)

    fig = Figure(figsize=(9, 3.4), dpi=100, facecolor="black")
    ax = fig.add_axes((0.01, 0.08, 0.98, 0.76))
    ax.imshow(composite, interpolation="nearest")
    ax.axis("off")
    x = 0.0
    for (image, _), name, sides in zip(
        views, ("sagittal", "coronal", "axial"), ("PA", "LR", "LR"), strict=True
    ):
        width = image.shape[0]
        ax.text(x + width / 2, -2, name, color="white", fontsize=9, ha="center", va="bottom")
        ax.text(x + 2, height / 2, sides[0], color="yellow", fontsize=8, va="center")
        ax.text(
            x + width - 2, height / 2, sides[1], color="yellow", fontsize=8, va="center", ha="right"
        )
        x += width + gap.shape[1]
    fig.text(0.5, 0.97, title, color="white", fontsize=10, ha="center", va="top")
    if note:
        fig.text(0.5, 0.02, note, color="red", fontsize=8, ha="center", wrap=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", facecolor="black")


def save_text_png(path: str | os.PathLike, title: str, note: str) -> None:
    """A small picture stating a scan's exclusion and its reason (no image to show). Atomic."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 1.6), dpi=100, facecolor="black")
    fig.text(0.5, 0.65, title, color="white", fontsize=10, ha="center")
    fig.text(0.5, 0.3, note, color="red", fontsize=8, ha="center", wrap=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", facecolor="black")
