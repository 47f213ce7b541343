"""Command line: ``python -m nidl_dino.demo OUT_DIR [--n-subjects N] [--seed S] [--sessions]``."""

from __future__ import annotations

import argparse
import sys
import time

from nidl_dino.demo import make_demo_dataset
from nidl_dino.errors import UserError


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


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
    args = parser.parse_args(argv)

    start = time.perf_counter()
    try:
        table = make_demo_dataset(
            args.out_dir,
            n_subjects=args.n_subjects,
            seed=args.seed,
            sessions=args.sessions,
            n_bad=args.n_bad,
        )
    except (UserError, ValueError, OSError) as err:
        parser.error(str(err))
    elapsed = time.perf_counter() - start
    n_scans = len(table) * (2 if args.sessions else 1)
    bad = table[table["bad_scan"] != ""]
    listed = ", ".join(
        f"{p} {k}" for p, k in zip(bad["participant_id"], bad["bad_scan"], strict=True)
    )
    print(
        f"wrote {len(table)} subjects, {n_scans} scans ({len(bad)} bad"
        f"{': ' + listed if listed else ''}) to {args.out_dir} in {elapsed:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
