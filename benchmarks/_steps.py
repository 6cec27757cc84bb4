"""Step functions the benchmarks' subprocess steps import by path."""


def noop() -> None:
    """A step that does nothing: what is measured is the engine around it."""
