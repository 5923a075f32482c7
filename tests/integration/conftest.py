"""The integration tier's fixtures: the in-process front (tests/support/front.py)."""

from tests.support.front import front, make_front

__all__ = ["front", "make_front"]  # fixtures, found by name
