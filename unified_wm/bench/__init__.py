"""Benchmarks behind `uwm bench attention|rollout|train|data|memory|gpu`; results go in BENCHMARKS.md."""
