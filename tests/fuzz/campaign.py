"""A fuzz campaign: many seeded worlds, a fixed number of hostile operations, a tally.

Worlds follow one another (each a pure function of (seed, world index)); a world lives for
``world_steps`` operations or until an escaping exception or a hang leaves it broken. Each
new violation signature is shrunk (up to ``shrink_max`` of them) and saved under ``out``.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tests.fuzz.checker import STEP_BUDGET_S, Session, Violation
from tests.fuzz.ops import generate
from tests.fuzz.shrink import save, shrink
from tests.fuzz.world import random_spec

DEFAULT_SEED = 20_260_207
WORLD_STEPS = 250


@dataclass
class Tally:
    operations: int = 0
    steps: int = 0
    worlds: int = 0
    seconds: float = 0.0
    violations: list[Violation] = field(default_factory=list)
    by_signature: Counter = field(default_factory=Counter)
    reproducers: list[Path] = field(default_factory=list)
    kinds: Counter = field(default_factory=Counter)   # operations run, by kind
    refused: Counter = field(default_factory=Counter)  # boundary refusals, by kind
    translated: int = 0
    faulted: int = 0

    @property
    def rate(self) -> float:
        return self.operations / self.seconds if self.seconds else 0.0

    def count(self, category: str) -> int:
        return sum(1 for v in self.violations if v.category == category)

    def summary(self, seed: int) -> str:
        lines = [f"seed {seed}: {self.operations} operations in {self.steps} steps over "
                 f"{self.worlds} worlds, {self.seconds:.1f} s, {self.rate:,.0f} ops/s",
                 f"translations judged {self.translated}, faulted {self.faulted}; refusals "
                 f"{sum(self.refused.values())} of {sum(self.kinds.values())} steps",
                 f"violations {len(self.violations)} (exceptions {self.count('exception')}, "
                 f"hangs {self.count('hang')})"]
        lines += [f"  {n:6d} x {sig}" for sig, n in self.by_signature.most_common()]
        lines += [f"  reproducer: {p}" for p in self.reproducers]
        return "\n".join(lines)


def campaign(seed: int = DEFAULT_SEED, n_ops: int = 10_000, out: str | Path = "fuzz-failures",
             *, shrink_max: int = 3, shrink_budget_s: float = 60.0,
             step_budget_s: float = STEP_BUDGET_S, world_steps: int = WORLD_STEPS,
             exclude: tuple[str, ...] = (), log: Callable[[str], None] | None = None) -> Tally:
    """Run worlds until ``n_ops`` operations; returns the tally (reproducers saved to out).

    ``exclude`` leaves operation kinds out (the short test keeps known-open findings apart).
    """
    tally = Tally()
    t0 = time.perf_counter()
    while tally.operations < n_ops:
        spec = random_spec(np.random.default_rng([seed, tally.worlds]), seed + tally.worlds)
        rng = np.random.default_rng([seed, tally.worlds, 1])
        tally.worlds += 1
        session = Session(spec, step_budget_s)
        if session.build_error is not None:
            _record(tally, session.build_error, spec, [], seed, out, shrink_max,
                    shrink_budget_s, step_budget_s, log)
            continue
        done = []
        for _ in range(world_steps):
            op = generate(session.world, rng, exclude)
            done.append(op)
            viols, weight = session.step(op)
            tally.operations += weight
            tally.steps += 1
            tally.kinds[op["k"]] += 1
            if session.last is not None and session.last.refused:
                tally.refused[op["k"]] += 1
            for v in viols:
                _record(tally, v, spec, done, seed, out, shrink_max, shrink_budget_s,
                        step_budget_s, log)
            if session.broken or tally.operations >= n_ops:
                break
        if session.checker is not None:
            tally.translated += session.checker.translated
            tally.faulted += session.checker.faulted
    tally.seconds = time.perf_counter() - t0
    return tally


def _record(tally: Tally, v: Violation, spec, ops, seed, out, shrink_max, shrink_budget_s,
            step_budget_s, log) -> None:
    new = v.signature not in tally.by_signature
    tally.violations.append(v)
    tally.by_signature[v.signature] += 1
    if log is not None and new:
        log(f"violation {v.signature} (world seed {spec.seed}, step {v.step}): {v.detail}")
    if new and ops and len(tally.reproducers) < shrink_max:
        small = shrink(spec, list(ops), v, shrink_budget_s, min(step_budget_s, 5.0))
        path = save(out, seed, spec, small, v, len(tally.reproducers))
        tally.reproducers.append(path)
        if log is not None:
            log(f"  shrunk to {len(small)} operation(s): {path}")
