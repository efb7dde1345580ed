"""Shrink a failing operation list to a minimal reproducer and save it (delta debugging).

Zeller and Hildebrandt's ddmin over the world's operation list (a candidate reproduces when
replaying it in a fresh world of the same spec shows a violation with the same signature),
then over the requests inside each remaining batch. The result is a JSON file naming the
world spec, the operations and the violation; ``python -m tests.fuzz --replay FILE`` runs it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.fuzz.checker import Session, Violation
from tests.fuzz.ops import Op
from tests.fuzz.world import WorldSpec

LIST_FIELDS = {"dma": ("sid", "pasid", "addr", "access", "dt"), "raw": ("rows",),
               "qi": ("descs",)}


def replay(spec: WorldSpec, ops: list[Op], budget_s: float = 10.0,
           stop_at: str | None = None) -> list[Violation]:
    """Run ``ops`` in a fresh world; stop at the first violation (or the first of ``stop_at``'s
    signature) or when the world breaks."""
    s = Session(spec, budget_s)
    if s.build_error is not None:
        return [s.build_error]
    found: list[Violation] = []
    for op in ops:
        viols, _ = s.step(op)
        found += viols
        if any(stop_at is None or v.signature == stop_at for v in viols) or s.broken:
            break
    return found


def ddmin(items: list, test: Callable[[list], bool], deadline: float) -> list:
    """Smallest-found sublist of ``items`` for which ``test`` holds (1-minimal if time allows)."""
    n = 2
    while len(items) >= 2 and time.monotonic() < deadline:
        chunk = -(-len(items) // n)
        subsets = [items[i:i + chunk] for i in range(0, len(items), chunk)]
        reduced = False
        for i in range(len(subsets)):
            complement = [x for j, s in enumerate(subsets) if j != i for x in s]
            if time.monotonic() >= deadline:
                break
            if test(complement):
                items, n, reduced = complement, max(n - 1, 2), True
                break
        if not reduced:
            if n >= len(items):
                break
            n = min(len(items), 2 * n)
    return items


def _rows(op: Op) -> list[tuple]:
    fields = LIST_FIELDS[op["k"]]
    return list(zip(*(op[f] for f in fields), strict=True))


def _with_rows(op: Op, rows: list[tuple]) -> Op:
    fields = LIST_FIELDS[op["k"]]
    new = dict(op)
    for i, f in enumerate(fields):
        new[f] = [r[i] for r in rows]
    return new


def shrink(spec: WorldSpec, ops: list[Op], v: Violation, budget_s: float = 60.0,
           step_budget_s: float = 5.0) -> list[Op]:
    """Minimal operation list (within ``budget_s`` of wall clock) that still shows ``v``."""
    deadline = time.monotonic() + budget_s
    sig = v.signature
    ops = ops[:v.step + 1] if v.step >= 0 else ops

    def fails(cand: list[Op]) -> bool:
        return any(x.signature == sig for x in replay(spec, cand, step_budget_s, stop_at=sig))

    if not fails(ops):
        return ops
    ops = ddmin(ops, fails, deadline)
    for i in range(len(ops)):
        if ops[i]["k"] not in LIST_FIELDS or len(_rows(ops[i])) < 2:
            continue
        head, this, tail = ops[:i], ops[i], ops[i + 1:]
        rows = ddmin(_rows(this), lambda r, h=head, o=this, t=tail: fails(
            [*h, _with_rows(o, r), *t]), deadline)
        ops = [*head, _with_rows(this, rows), *tail]
    return ops


def save(out_dir: str | Path, seed: int, spec: WorldSpec, ops: list[Op], v: Violation,
         index: int) -> Path:
    """Write the reproducer as fuzz-repro-<seed>-<index>.json under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"fuzz-repro-{seed}-{index}.json"
    doc: dict[str, Any] = {"seed": seed, "world": spec.to_json(), "violation": v.to_json(),
                           "ops": ops, "replay": f"python -m tests.fuzz --replay {path}"}
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def load(path: str | Path) -> tuple[WorldSpec, list[Op]]:
    doc = json.loads(Path(path).read_text())
    return WorldSpec.from_json(doc["world"]), doc["ops"]
