"""Benchmarks (`make bench`). Each module ``deploy/bench/bench_<name>.py`` defines
``run(quick: bool) -> dict`` that measures a target and its baseline side by side in the same
process and returns ``{"name", "ratio"/"ratios", "target", "pass", ...}``. The runner prints one
line per benchmark and saves each result as JSON under ``runs/bench/``."""
