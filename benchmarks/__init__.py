"""Micro-benchmarks of the emulator's hot paths; `python -m benchmarks` (make bench) runs all.

Each bench measures wall time on one process with time.perf_counter (best of a few
repetitions) beside a raw numpy baseline measured in the same run, prints a table and writes
benchmarks/results/<name>.json. Goals are reported against, never asserted.
"""
