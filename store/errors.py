"""Errors the store raises for bad input; the CLI prints them as one line."""


class StoreError(Exception):
    """The store path, its contents or a request on it is not usable."""
