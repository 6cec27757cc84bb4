"""``python -m benchmarks``: the side-by-side suite (:mod:`benchmarks.suite`); ``--help``."""

from benchmarks.suite import main

main()
