"""The project's one error type: every failure a user can cause (a bad path, a damaged store, a
wrong option) is a ``RoisegError`` (or a subclass naming its part: ``StoreError``,
``CheckpointError`` ...), and the command line prints its message alone: one line, exit code 1, no
traceback."""


class RoisegError(Exception):
    """An expected, user-fixable failure; its message says what is wrong and what to do."""
