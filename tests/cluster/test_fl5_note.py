"""A 5-level first level under nesting is kept but noted as hardware-only: QEMU 10's
intel-iommu (x-flts=on) accepts 4-level first-level paging only."""

from __future__ import annotations

from tests.cluster.test_config import base, parse


def test_five_level_first_level_under_nesting_gets_a_hardware_only_note():
    cfg = parse(base(), ("vm.web.fl_levels=5",))
    assert cfg.vms[0].fl_levels == 5
    assert any("vm.web" in n and "5-level" in n and "QEMU" in n for n in cfg.notes)
    assert not any("5-level" in n for n in parse(base()).notes)
    shadow = parse(base(), ("vm.web.fl_levels=5", "vm.web.mode=shadow"))
    assert not any("5-level" in n for n in shadow.notes)
