"""``agentattn.io.one_line``: the one-line error text every command prints."""


def test_one_line_collapses_cuts_and_names_an_empty_error():
    from agentattn.io import one_line

    assert one_line(ValueError("bad\n  shape\t(2, 3)")) == "bad shape (2, 3)"
    assert one_line(ValueError("x" * 500), 300) == "x" * 297 + "..."
    assert one_line(KeyError()) == "KeyError"
