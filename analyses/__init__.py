"""Evaluation code: per-level clustering metrics and readers for the original scVAE outputs."""
