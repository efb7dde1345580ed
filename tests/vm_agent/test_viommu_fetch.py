"""VIommu.submit's fetch of a guest's own submission (vm_agent/viommu.py: decoded without
queueing, word descriptors decoded once) against the queue model it shortcuts: append to the
queue, fetch from the head until empty or a malformed descriptor sets IQE (VT-d spec 6.5.2.10,
QEMU vtd_fetch_inv_desc). Every output, counter, error and what stays queued must agree,
through queue errors, tail writes under IQE and FSTS.IQE clears."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from host_iommu import qi
from vm_agent.viommu import VIommu


class QueueModel:
    """The vIOMMU as the queue: every tail write appends, then fetches from the head."""

    def __init__(self) -> None:
        self.queued: list = []
        self.iqe, self.iqe_error = False, None
        self.descriptors = self.errors = 0
        self.counts: dict[str, int] = {}

    def _fetch(self) -> list:
        out = []
        while self.queued:
            d = self.queued[0]
            cmd = qi.decode_words(*d) if type(d) is tuple else qi.decode(d)
            if isinstance(cmd, qi.DescError):
                self.iqe, self.iqe_error = True, cmd
                self.errors += 1
                break
            self.queued.pop(0)
            self.descriptors += 1
            self.counts[cmd.name] = self.counts.get(cmd.name, 0) + 1
            out.append(cmd)
        return out

    def submit(self, descs: list) -> list:
        self.queued.extend(descs)
        return [] if self.iqe else self._fetch()

    def clear_iqe(self, replacement) -> list:
        if not self.iqe:
            return []
        self.iqe, self.iqe_error = False, None
        if replacement is None:
            self.queued.pop(0)
        else:
            self.queued[0] = replacement
        return self._fetch()


_GOOD = [qi.WAIT_WORDS, qi.piotlb_words(1, 0, qi.QI_GRAN_PSI_PASID, 0x5000, 0),
         qi.piotlb_words(2, 3, qi.QI_GRAN_PSI_PASID, 0x40000, 2, ih=True),
         qi.piotlb_words(1, 0, qi.QI_GRAN_NONG_PASID),
         qi.iotlb_words(qi.QI_IOTLB_GRAN_PAGE, 1, 0x7000, 0),
         qi.iotlb_words(qi.QI_IOTLB_GRAN_DOMAIN, 4)]
_BAD = [(0, 0, 0, 0), (qi.WAIT_WORDS[0] & ~0x30, 0, 0, 0), (*qi.WAIT_WORDS[:3], 1),
        (0xF, 0, 0, 0)]
_DESC = st.one_of(st.sampled_from(_GOOD), st.sampled_from(_BAD),
                  st.sampled_from(_GOOD + _BAD).map(qi.as_desc),
                  st.tuples(*[st.integers(0, (1 << 64) - 1)] * 4))
_STEP = st.one_of(st.lists(_DESC, max_size=6).map(lambda d: ("submit", d)),
                  st.one_of(st.none(), _DESC).map(lambda r: ("clear", r)))


def _state(v) -> tuple:
    return (v.iqe, v.iqe_error, v.descriptors, v.errors, v.counts,
            [d if type(d) is tuple else d.item() for d in v.queued])


@settings(max_examples=300, deadline=None)
@given(steps=st.lists(_STEP, max_size=25))
def test_submit_fetches_as_the_queue_does(steps):
    v, ref = VIommu(caching_mode=False), QueueModel()
    for kind, arg in steps:
        got = v.submit(list(arg)) if kind == "submit" else v.clear_iqe(arg)
        want = ref.submit(list(arg)) if kind == "submit" else ref.clear_iqe(arg)
        assert got == want
        assert _state(v) == _state(ref)


def test_a_bad_descriptor_mid_submission_stays_queued_with_those_after_it():
    v = VIommu(caching_mode=False)
    good, bad = _GOOD[1], _BAD[0]
    assert v.submit([good, bad, good, qi.WAIT_WORDS]) == [qi.decode_words(*good)]
    assert v.iqe and v.errors == 1 and v.queued == [bad, good, qi.WAIT_WORDS]
    assert v.submit([good]) == [] and len(v.queued) == 4    # nothing fetched under IQE
    assert v.clear_iqe(qi.WAIT_WORDS) == [qi.decode_words(*w) for w in
                                          (qi.WAIT_WORDS, good, qi.WAIT_WORDS, good)]
    assert v.queued == [] and v.counts == {"piotlb": 3, "wait": 2}
    # the decoded words are reused: the same command object as a fresh decode
    assert v.submit([good]) == [qi.decode_words(*good)] and v.descriptors == 6
