"""The oracle's state stays bounded when the guest retires dead unmap ids, with equal results."""

from __future__ import annotations

import numpy as np

from host_iommu.oracle import Oracle

PAGES = 32


def _long_run(epochs: int, seed: int
              ) -> tuple[list[tuple[np.ndarray, np.ndarray]], tuple[int, int], int]:
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
    # held entries, and the dense array's length (8 bytes per id it spans)
    peak_slots = pruned._vms[7].ret.size
    return results, (peak, peak_slots), len(full.returned)


def test_retired_ids_change_no_result_and_state_stays_bounded():
    results, (peak, _slots), unpruned = _long_run(400, seed=3)
    stale = sum(int(s.sum()) for s, _w in results)
    assert stale > 0                      # rogue DMAs after an unmap returned are still caught
    assert peak <= PAGES + 20             # live ids: one per page, plus one epoch's dead ones
    assert unpruned > 50 * PAGES          # without retirement it grows with the run


def test_state_does_not_grow_with_run_length():
    _r, (peak_short, _), _ = _long_run(100, seed=5)
    _r, (peak_long, slots_long), unpruned = _long_run(1600, seed=5)
    assert peak_long <= PAGES + 20 and peak_short <= PAGES + 20
    assert unpruned > 8000 and slots_long < 4096   # retired prefixes are cut off


def test_retire_counts_what_it_dropped_and_ignores_unknown_ids():
    o = Oracle()
    o.unmap_returned(1, 4, 100)
    o.unmap_returned(2, 4, 100)
    assert o.retire(1, [4, 5]) == 1
    assert o.returned == {(2, 4): 100}
    stale, window = o.check(np.array([2]), np.array([4]), np.array([150]), np.array([True]))
    assert stale.tolist() == [True] and window.tolist() == [50]


def test_far_and_retired_ids_still_answer_without_growing_the_array():
    """A hostile guest's huge id, and an id below a cut-off prefix, are kept aside (not in a
    2^62-element array) and answer as they would in a plain dict."""
    o = Oracle()
    for uid in range(3000):
        o.unmap_returned(1, uid, 10 * uid)
    o.unmap_returned(1, 1 << 62, 5)
    assert o.retire(1, range(2000)) == 2000       # a retired prefix: cut off
    o.unmap_returned(1, 7, 70)                    # below the cut: still recorded
    assert o._vms[1].ret.size < 4096 + 1
    vm = np.ones(4, dtype=np.int64)
    uid = np.array([1 << 62, 7, 2500, 1999])
    stale, window = o.check(vm, uid, np.full(4, 30_000), np.ones(4, dtype=bool))
    assert stale.tolist() == [True, True, True, False]
    assert window.tolist() == [29_995, 29_930, 5_000, 0]
    assert o.returned.get((1, 1 << 62)) == 5 and o.returned.get((1, 1999)) is None
    assert len(o.returned) == 1000 + 2
