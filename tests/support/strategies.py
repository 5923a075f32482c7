"""Hypothesis strategies the property tests share."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st


def json_values(max_leaves: int) -> st.SearchStrategy[Any]:
    """Any JSON value, nested lists and objects included (hypothesis)."""

    def containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        return st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)

    return st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=5),
        containers,
        max_leaves=max_leaves,
    )
