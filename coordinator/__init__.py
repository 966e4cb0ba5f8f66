"""A Trio-based inference coordinator."""

__version__ = "0.1.0"
