"""Host second-level churn: the VMM balloons or unplugs guest memory at a fixed interval.

Models host-side GPA->HPA changes made under a running guest (virtio-balloon inflate/deflate,
memory hot-unplug). Each change invalidates everything derived from the VM's second-level
table (Linux drivers/iommu/intel/cache.c flushes every nested IOTLB and device-TLB tag).
"""

from __future__ import annotations

from dataclasses import dataclass

from workloads.base import GuestContext
from workloads.nic import check_positive, schedule_at

CHURN_KINDS = ("balloon", "unplug")


@dataclass(frozen=True)
class ChurnParams:
    """``[vm.<group>.churn]``: what changes, how often, how much, from when."""

    kind: str = "balloon"       # "balloon" (inflate, deflate, ...) or "unplug"
    interval_us: float = 1000.0
    pages: int = 256            # 4 KiB pages per change
    start_us: float = 0.0

    def validate(self) -> list[tuple[str, str]]:
        errors: list[tuple[str, str]] = []
        if self.kind not in CHURN_KINDS:
            errors.append(("kind", f"{self.kind!r} is not one of {list(CHURN_KINDS)}"))
        errors += check_positive(self.interval_us, "interval_us")
        errors += check_positive(self.pages, "pages")
        if not isinstance(self.pages, int) or isinstance(self.pages, bool):
            errors.append(("pages", f"{self.pages!r} is not an integer"))
        errors += check_positive(self.start_us, "start_us", zero_ok=True)
        return errors


class Churn:
    """Every ``interval_us`` from ``start_us``: balloon alternately inflates and deflates
    ``pages``; unplug unplugs ``pages``. Counts what the guest reports back."""

    def __init__(self, params: ChurnParams | None = None) -> None:
        self.params = params if params is not None else ChurnParams()
        self.changes = 0
        self.inflated_pages = 0
        self.deflated_pages = 0
        self.unplugged_pages = 0
        self._inflate_next = True

    def start(self, ctx: GuestContext) -> None:
        schedule_at(ctx, round(self.params.start_us * 1000.0), self._tick)

    def _tick(self, ctx: GuestContext, t_ns: int) -> None:
        p = self.params
        if p.kind == "unplug":
            self.unplugged_pages += ctx.unplug(t_ns, p.pages)
        elif self._inflate_next:
            self.inflated_pages += ctx.balloon_inflate(t_ns, p.pages)
        else:
            self.deflated_pages += ctx.balloon_deflate(t_ns, p.pages)
        self._inflate_next = not self._inflate_next
        self.changes += 1
        schedule_at(ctx, t_ns + max(1, round(p.interval_us * 1000.0)), self._tick)
