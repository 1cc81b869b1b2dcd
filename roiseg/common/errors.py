"""Errors a user can cause; the CLI prints their message alone (no traceback)."""


class FeatCacheError(Exception):
    """Base class of expected, user-fixable failures."""
