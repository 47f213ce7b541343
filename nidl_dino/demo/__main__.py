"""Command line: ``python -m nidl_dino.demo OUT_DIR [--n-subjects N] [--seed S] [--sessions]
[--variant NAME] [knob flags]``.

``--variant`` picks a preset of :mod:`nidl_dino.demo.variant`; the knob flags (``--no-skull``,
``--bias-scale 0``, ``--lesion-count 10``...) change single knobs of it.
"""

from __future__ import annotations

import argparse
import sys
import time

from nidl_dino.demo import make_demo_dataset
from nidl_dino.demo.variant import PRESETS, SITE_SETS, CohortVariant
from nidl_dino.errors import UserError

#: Knob flags: (flag, CohortVariant field, help).
_FLOAT_KNOBS = (
    ("--bias-scale", "bias_scale", "bias-field strength, x the site's (0: flat field)"),
    ("--noise-scale", "noise_scale", "noise sigma, x the site's (0: none)"),
    ("--ventricle-gain", "ventricle_gain", "age gain of log ventricle volume (0: no effect)"),
    ("--thinning-gain", "thinning_gain", "grey-matter fraction lost per unit age (0: none)"),
    ("--gm-intensity-gain", "gm_intensity_gain", "grey-matter intensity rise with age (0: none)"),
    ("--wm-intensity-gain", "wm_intensity_gain", "white-matter intensity fall with age (0: none)"),
    ("--lesion-count", "lesion_count", "mean white-matter lesions at 80 years (0: none)"),
    ("--lesion-radius-mm", "lesion_radius_mm", "median lesion radius at onset (mm)"),
    ("--lesion-intensity", "lesion_intensity", "lesion T1w intensity, white matter = 1"),
)


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def variant_from_args(args: argparse.Namespace) -> CohortVariant:
    """The preset named by ``--variant`` with the knob flags that were given applied to it."""
    changes: dict = {}
    if args.skull is not None:
        changes["skull"] = args.skull
    if args.sites is not None:
        changes["sites"] = SITE_SETS[args.sites]
    for _, field, _ in _FLOAT_KNOBS:
        value = getattr(args, field)
        if value is not None:
            changes[field] = value
    preset = PRESETS[args.variant]
    if not changes:
        return preset
    shown = ",".join(f"{k}={args.sites if k == 'sites' else v}" for k, v in sorted(changes.items()))
    return preset.replace(name=f"{preset.name}+{shown}", **changes)


def main(argv: list[str] | None = None) -> int:
    """Write the demo dataset and print a one-line summary; usage errors exit with status 2."""
    parser = _OneLineParser(
        prog="python -m nidl_dino.demo",
        description="Write the synthetic T1w demo cohort (BIDS) to OUT_DIR.",
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", help="output directory (new, empty or demo)")
    parser.add_argument("--n-subjects", type=int, default=24, help="number of subjects (24)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (0)")
    parser.add_argument("--sessions", action="store_true", help="two sessions per subject")
    parser.add_argument("--n-bad", type=int, default=2, help="subjects with a bad scan (2)")
    parser.add_argument(
        "--workers", type=int, default=1, help="processes writing subjects at once (1); same bytes"
    )
    knobs = parser.add_argument_group(
        "cohort variant", "a preset, and single knobs changed from it (nidl_dino.demo.variant)"
    )
    knobs.add_argument(
        "--variant", choices=list(PRESETS), default="default", help="preset (default)"
    )
    knobs.add_argument(
        "--skull",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="whole heads; --no-skull: skull-stripped scans, zero outside the brain",
    )
    knobs.add_argument("--sites", choices=list(SITE_SETS), help="set of site protocols")
    for flag, field, text in _FLOAT_KNOBS:
        knobs.add_argument(flag, dest=field, type=float, metavar="X", help=text)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    try:
        variant = variant_from_args(args)
        table = make_demo_dataset(
            args.out_dir,
            n_subjects=args.n_subjects,
            seed=args.seed,
            sessions=args.sessions,
            n_bad=args.n_bad,
            variant=variant,
            workers=args.workers,
        )
    except (UserError, ValueError, OSError) as err:
        parser.error(str(err))
    elapsed = time.perf_counter() - start
    n_scans = len(table) * (2 if args.sessions else 1)
    bad = table[table["bad_scan"] != ""]
    listed = ", ".join(
        f"{p} {k}" for p, k in zip(bad["participant_id"], bad["bad_scan"], strict=True)
    )
    shown = "" if variant.name == "default" else f" (variant {variant.name})"
    print(
        f"wrote {len(table)} subjects, {n_scans} scans ({len(bad)} bad"
        f"{': ' + listed if listed else ''}) to {args.out_dir}{shown} in {elapsed:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
