"""Measures computed from stored matrices alone (no model, no autograd)."""
