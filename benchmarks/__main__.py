"""Run every benchmark in turn (make bench): one table each, JSON under benchmarks/results/."""

from __future__ import annotations

from benchmarks import bench_e2e, bench_jit, bench_ray, bench_run, bench_translate

BENCHES = {"translate": bench_translate.main, "run": bench_run.main, "ray": bench_ray.main,
           "e2e": bench_e2e.main, "jit": bench_jit.main}


def main() -> None:
    for name, run in BENCHES.items():
        print(f"== {name} ==")
        run([])


if __name__ == "__main__":
    main()
