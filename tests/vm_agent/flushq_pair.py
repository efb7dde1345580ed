"""Drive the live flush queues (vm_agent/flushq.py) and the reference
(vm_agent/reference_flushq.py) in lockstep: the pair and the script runner the differential
tests share (test_ref_flushq.py, test_kernel_flushq.py)."""

from __future__ import annotations

from vm_agent import flushq as live
from vm_agent import reference_flushq as ref

ERR = "FlushQueueError"


def as_values(r) -> tuple:
    """A Reusable as plain values: the (pfn, pages), their stale windows, the largest."""
    return [tuple(x) for x in r], list(r.stale_ns), r.max_stale_ns


class Pair:
    """A live and a reference policy driven in lockstep: every answer, refusal and public
    counter must agree after each call. ``check_state`` is a hook for more checks."""

    def __init__(self, strict: bool = False, **kw) -> None:
        if strict:
            self.lq, self.rq = live.StrictPolicy(**kw), ref.StrictPolicy(**kw)
        else:
            self.lq, self.rq = live.FlushQueue(**kw), ref.FlushQueue(**kw)
        assert self.lq.lazy == self.rq.lazy

    def both(self, what: str, *args):
        outs = []
        for q, err in ((self.lq, live.FlushQueueError), (self.rq, ref.FlushQueueError)):
            try:
                out = getattr(q, what)(*args)
            except err:
                out = ERR
            if what == "queue" and out != ERR:
                out = (as_values(out.freed), out.flush_now, out.timer_deadline_ns)
            elif what == "flush_done" and out != ERR:
                out = as_values(out)
            outs.append(out)
        assert outs[0] == outs[1], (what, args, outs)
        self.check()
        self.check_state(after_flush=what == "flush_done" and outs[0] != ERR)
        return outs[0]

    def check(self) -> None:
        lq, rq = self.lq, self.rq
        for k in ("flushes", "flushes_full", "flushes_timer", "max_pending"):
            assert getattr(lq, k) == getattr(rq, k), k
        assert lq.pending() == rq.pending()
        assert lq.inflight() == rq.inflight()
        assert lq.timer_deadline() == rq.timer_deadline()
        if lq.lazy:
            assert lq.timer_max_ns == rq.timer_max_ns

    def check_state(self, after_flush: bool) -> None:
        """More checks after each call (none here)."""


def run_script(pair: Pair, steps, eager: bool) -> None:
    """Steps: ("unmap", cpu, pages, dt), ("done", dt), ("timer", offset from the deadline),
    ("outside",), ("due", offset). ``eager``: finish a flush when asked, as dma.py does."""
    t = 0
    pfn = 0x1000
    for step in steps:
        kind = step[0]
        if kind == "unmap":
            _, cpu, pages, dt = step
            t += dt
            out = pair.both("queue", cpu, pfn, pages, t)
            pfn += pages
            if out != ERR and out[1] and eager:
                t += 700
                pair.both("flush_done", t)
        elif kind == "done":
            t += step[1]
            pair.both("flush_done", t)
        elif kind == "timer":
            deadline = pair.lq.timer_deadline()
            t = t if deadline is None else max(t, deadline + step[1])
            if pair.both("on_timer", t) and eager:
                t += 700
                pair.both("flush_done", t)
        elif kind == "outside":
            pair.both("start_flush")
        else:
            deadline = pair.lq.timer_deadline()
            pair.both("due", t if deadline is None else deadline + step[1])
