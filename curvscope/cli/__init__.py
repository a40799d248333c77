"""The command line: a thin layer over the Python API (no autograd here)."""
