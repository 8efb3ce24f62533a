"""Shared building blocks of privrec: data, encoder, training, privacy and metrics."""
