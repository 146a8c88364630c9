"""Benchmarks behind `uwm bench attention|rollout|train|data|memory|gpu|routing`; results go in BENCHMARKS.md."""
