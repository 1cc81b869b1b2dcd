"""Decoder trainer over the feature cache."""

from featcache.threads import configure_threads

configure_threads()  # before torch is imported anywhere
