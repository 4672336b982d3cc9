"""One DeepShare run of a given length on the full-data schedule, as a results row (JSON).

    python bench/gpu/deepshare_steps.py --budget 2% --steps 8228 --device cuda --runs DIR --out ROW.json

The second half of ``bench/gpu/full_data.sh`` on its own: when the SNL rows of a budget are already
measured (their total steps known), DeepShare is trained for exactly as many steps, without repeating
the search.  Rows merge with the SNL rows into the JSON that ``accuracy_vs_budget.py --rows-from`` reads.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from accuracy_vs_budget import deepshare_row  # noqa: E402

from cifar_runs import Schedule  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--budget", required=True)
    p.add_argument("--steps", type=int, required=True, help="optimizer steps (the SNL run's total)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--runs", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="the row, as JSON")
    args = p.parse_args()
    sched = Schedule.full_data()
    sched.device = args.device
    row = deepshare_row(args.model, args.budget, sched, args.runs / "full_fulldata", steps=args.steps)
    args.out.write_text(json.dumps(row, indent=2) + "\n")
    print(args.budget, row["relus"], row["acc"], row["acc_run_test"], row["steps"], flush=True)


if __name__ == "__main__":
    main()
