"""Command line: ``python -m tests.fuzz --ops N --seed S [--out DIR]`` or ``--replay FILE``.

Prints operations, rate (ops/s), violations, escaping exceptions and hangs; exits 1 on any
violation.
"""

from __future__ import annotations

import argparse
import json
import sys

from tests.fuzz.campaign import DEFAULT_SEED, campaign
from tests.fuzz.checker import STEP_BUDGET_S
from tests.fuzz.shrink import load, replay


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__)
    ap.add_argument("--ops", type=int, default=100_000, help="hostile operations to run")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--out", default="fuzz-failures", help="where reproducers are saved")
    ap.add_argument("--shrink-max", type=int, default=3,
                    help="violation signatures to shrink and save")
    ap.add_argument("--step-budget", type=float, default=STEP_BUDGET_S,
                    help="wall-clock seconds one operation may take before it is a hang")
    ap.add_argument("--replay", metavar="FILE", help="replay a saved reproducer instead")
    a = ap.parse_args(argv)
    if a.replay:
        spec, ops = load(a.replay)
        viols = replay(spec, ops, a.step_budget)
        print(f"replayed {len(ops)} operation(s) in a world of {len(spec.vms)} VMs")
        for v in viols:
            print(f"violation {v.signature} at step {v.step}: {v.detail}")
            print(f"  operation: {json.dumps(v.op)[:400]}")
        return 1 if viols else 0
    tally = campaign(a.seed, a.ops, a.out, shrink_max=a.shrink_max,
                     step_budget_s=a.step_budget, log=lambda s: print(s, flush=True))
    print(f"operations {tally.operations}")
    print(f"rate {tally.rate:,.0f} ops/s")
    print(f"violations {len(tally.violations)}")
    print(f"exceptions {tally.count('exception')}")
    print(f"hangs {tally.count('hang')}")
    print(tally.summary(a.seed))
    return 1 if tally.violations else 0


if __name__ == "__main__":
    sys.exit(main())
