"""The Flower ServerApp side of privrec: aggregation, central DP, evaluation, checkpoints."""
