"""Decoder trainer over the feature cache."""
