"""The oracle's state stays bounded when the guest retires dead unmap ids, with equal results."""

from __future__ import annotations

import numpy as np

from host_iommu.oracle import Oracle

PAGES = 32


def _long_run(epochs: int, seed: int) -> tuple[list[tuple[np.ndarray, np.ndarray]], int, int]:
    """A guest recycling PAGES IOVA pages with rogue DMAs to unmapped ones, against two
    oracles: one never pruned and one the guest tells about ids no page carries any more
    (retired at the end of each epoch, after that epoch's DMAs were checked)."""
    rng = np.random.default_rng(seed)
    full, pruned = Oracle(), Oracle()
    tag = np.full(PAGES, -1, dtype=np.int64)      # unmap id that last covered each page
    carriers: dict[int, int] = {}                # unmap id -> pages it still tags
    next_id, t, results, peak = 0, 0, [], 0
    for _epoch in range(epochs):
        dead: list[int] = []
        dmas = []
        for _ in range(20):
            t += int(rng.integers(1, 500))
            page = int(rng.integers(PAGES))
            old = int(tag[page])
            if rng.random() < 0.5:                 # unmap (a mapped or an already unmapped page)
                tag[page], uid = next_id, next_id
                carriers[uid] = 1
                next_id += 1
                t_ret = t + int(rng.integers(0, 3000))
                for o in (full, pruned):
                    o.unmap_returned(7, uid, t_ret)
            else:                                  # map again
                tag[page] = -1
            if old >= 0:
                carriers[old] -= 1
                if carriers[old] == 0:
                    dead.append(old)
                    del carriers[old]
            # DMAs, stamped with the tag of their page when issued (some to unmapped pages)
            pages = rng.integers(PAGES, size=3)
            dmas.append((tag[pages].copy(), t + rng.integers(0, 4000, size=3)))
        for tags, times in dmas:
            vm = np.full(tags.size, 7)
            ok = np.ones(tags.size, dtype=bool)
            a, b = full.check(vm, tags, times, ok), pruned.check(vm, tags, times, ok)
            assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
            results.append(a)
        pruned.retire(7, dead)
        peak = max(peak, len(pruned.returned))
    return results, peak, len(full.returned)


def test_retired_ids_change_no_result_and_state_stays_bounded():
    results, peak, unpruned = _long_run(400, seed=3)
    stale = sum(int(s.sum()) for s, _w in results)
    assert stale > 0                      # rogue DMAs after an unmap returned are still caught
    assert peak <= PAGES + 20             # live ids: one per page, plus one epoch's dead ones
    assert unpruned > 50 * PAGES          # without retirement it grows with the run


def test_state_does_not_grow_with_run_length():
    _r, peak_short, _ = _long_run(100, seed=5)
    _r, peak_long, _ = _long_run(800, seed=5)
    assert peak_long <= PAGES + 20 and peak_short <= PAGES + 20


def test_retire_counts_what_it_dropped_and_ignores_unknown_ids():
    o = Oracle()
    o.unmap_returned(1, 4, 100)
    o.unmap_returned(2, 4, 100)
    assert o.retire(1, [4, 5]) == 1
    assert o.returned == {(2, 4): 100}
    stale, window = o.check(np.array([2]), np.array([4]), np.array([150]), np.array([True]))
    assert stale.tolist() == [True] and window.tolist() == [50]
