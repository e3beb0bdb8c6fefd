"""Stage `check`: validate params.yaml before any other stage runs (and so before DVC deletes anything).

    python stages/check.py --out data/params_checked.json

DVC removes a stage's outputs just before it runs the stage's command, so a value that fails only
inside a stage (or only later, in a stage that never reran) costs outputs. This stage depends on
the whole of params.yaml (and the code and catalog it checks with), and `base` (upstream of every other stage) depends on its
output, so any params change runs it first: the schema and catalog checks of every stage, hand
edits (params.yaml no longer matching the digest its composition recorded), the devices and backend,
the MLflow database (it must open: not locked, not corrupt), and the model's depth and tokens
(personaspace.checks). It prints the whole study's projected duration on this device; on a CPU a
projection over checks.LONG_RUN_HOURS is refused unless PERSONASPACE_CONFIRM_LONG_RUN=1 is set.
On failure it prints every problem with its fix and exits 2, and DVC stops there. Its output is a
constant stamp, so a passing check reruns nothing else.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import personaspace.cpu_kernels  # noqa: F401  (pins the CPU kernels before numpy and torch load: cpu_kernels.py)

from personaspace.checks import check_params
from personaspace.io import write_json

STAMP = {"params": "checked", "by": "stages/check.py"}  # constant: a pass must not invalidate later stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--raw", type=Path, default=Path("models/raw"), help="a materialised model, if any (faster)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    problems, notes = check_params(args.params, raw_dir=args.raw)
    for note in notes:
        print(f"note: {note}")
    if problems:
        print(f"{args.params} cannot run; no stage ran:", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        print(
            f"{args.params} now holds these params (a `dvc exp run -S ...` composed them before this check): "
            f"`git restore {args.params}` brings back the committed ones, or compose others with `dvc exp run -S ...`",
            file=sys.stderr,
        )
        sys.exit(2)
    write_json(STAMP, args.out)
    print(f"{args.params}: checked")


if __name__ == "__main__":
    main()
