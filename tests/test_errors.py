"""The one-line preview of a list of names in UserError messages."""

from sge_repro.errors import preview


def test_preview_shows_the_first_five_and_counts_the_rest():
    assert preview([]) == "none"
    assert preview(["a", "b"]) == "a, b"
    assert preview([f"n{i}" for i in range(5)]) == "n0, n1, n2, n3, n4"
    assert preview([f"n{i}" for i in range(8)]) == "n0, n1, n2, n3, n4 and 3 more"
    assert preview(["a", "b", "c"], limit=1) == "a and 2 more"
