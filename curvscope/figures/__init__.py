"""Figures drawn from a stored results file alone (never by recomputing)."""
