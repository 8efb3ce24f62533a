"""Runnable experiments and benchmarks (baselines, throughput, simulations)."""
