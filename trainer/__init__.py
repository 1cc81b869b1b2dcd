"""Decoder trainer over the feature cache."""

from roiseg.featcache.threads import configure_threads

configure_threads()  # before torch is imported anywhere
