"""Errors for bad input. Every module's bad-input error derives from ``BadInput``, so the
CLI turns all of them into ``error: ...`` and exit code 2 in one place (``app.cli.main``)."""


class BadInput(ValueError):
    """An input (option, file, model, data, query, store) that cannot be used; the message
    is one line naming it and what to do."""


class StoreError(BadInput):
    """The store path, its contents or a request on it is not usable."""
