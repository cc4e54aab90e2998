"""Shared test helpers (data preparation for trainer/eval/tracking tests)."""
