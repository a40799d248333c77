"""`python -m curvscope` runs the command line."""
from curvscope.cli.entry import run

run()
