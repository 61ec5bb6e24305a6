"""Helpers for kubetune's tests and benchmarks (not shipped in any image)."""
