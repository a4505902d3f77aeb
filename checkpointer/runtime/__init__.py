"""Distributed helpers, retries, progress bars, failpoints: usable from anywhere."""
