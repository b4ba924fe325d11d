"""`python -m benchmarks.toy`: the q* vs p* distinguishability table of the chosen settings (settings.py)."""

from .settings import main

main()
