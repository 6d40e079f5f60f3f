"""Wiring: the `fogfl` CLI, the testbed launcher, the in-process engine, the study harness,
configs and topology presets, the embedded broker, containers."""
