"""`python -m metarun` is the `metarun` command."""
from metarun.cli import main

main()
