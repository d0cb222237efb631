"""The one error type the whole toolkit raises for problems a user can fix."""


class StoreError(Exception):
    """A problem with the store or with what was asked of it; shown as one line, never a traceback."""
