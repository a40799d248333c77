"""`python -m curvscope` runs the command line."""
from curvscope.cli.main import main

main(prog_name="curvscope")
