"""A hostile-guest fuzzer for iommu-emu: seeded worlds, hostile operations, invariant checker.

A run builds small worlds of 2-4 VMs (shadow, nested, pass-through, mixed, some with ATS)
through the real HostServer / VmSetup path, drives them with random operations at every
boundary a guest controls (world.py, ops.py), checks independent isolation invariants after
every batch (checker.py) and shrinks any violation to a minimal reproducer (shrink.py).
``python -m tests.fuzz --ops N --seed S`` runs it; docs/fuzzing.md describes it.
"""
