"""The benchmark (`scripts/bench`): the worker against echo responders on one broker."""
