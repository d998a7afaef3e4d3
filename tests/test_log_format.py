"""Log formats: every access-log value stays on one line and parse_fields reads it back."""

import pytest

from gconn.log import _quoted, parse_fields

AWKWARD = ["plain", "with blank", "line\nbreak", "carriage\rreturn", "tab\there", 'a "quote"',
           "back\\slash and blank", "\\n written out", "bell\x07", "line\u2028separator",
           "lone \udcff surrogate", "é ü", "", "key=value"]


@pytest.mark.parametrize("value", AWKWARD, ids=[repr(value) for value in AWKWARD])
def test_logfmt_value_is_one_line_and_reads_back(value):
    """A logfmt value with control characters is escaped onto one line; parse_fields undoes it."""
    line = f"2026-11-23T13:40:01.123Z conn=7 error={_quoted(value)} end=error"
    assert line.isprintable(), line
    assert parse_fields(line) == {"conn": "7", "error": value, "end": "error"}
