import pytest

from dsnt_export.errors import PatternError
from dsnt_export.patterns import NM, Unstructured, parse_pattern


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2:4", NM(2, 4)),
        ("4:8", NM(4, 8)),
        ("1:4", NM(1, 4)),
        ("2:8", NM(2, 8)),
        (" 3 : 16 ", NM(3, 16)),
        ("unstructured:0.6", Unstructured(0.6)),
        ("0.6", Unstructured(0.6)),
        ("60%", Unstructured(0.6)),
        ("Unstructured=0.5", Unstructured(0.5)),
    ],
)
def test_parse_valid(text, expected):
    assert parse_pattern(text) == expected


@pytest.mark.parametrize(
    "text", ["5:4", "2:0", "0:4", "4:4", "abc", "unstructured:1.2", "1.0", "0", "", "2:4:8", "-0.5"]
)
def test_parse_invalid_raises_clear_error(text):
    with pytest.raises(PatternError) as e:
        parse_pattern(text)
    assert len(str(e.value)) > 30  # says what was received and what is expected
    assert isinstance(e.value, ValueError)


def test_n_counts_kept_weights():
    p = parse_pattern("1:4")
    assert p.n_keep == 1 and p.n_prune == 3 and p.sparsity == 0.75
    assert str(p) == "1:4"
    assert parse_pattern("2:8").n_prune == 6


def test_non_string_and_roundtrip():
    with pytest.raises(PatternError):
        parse_pattern(2.4)
    for s in ["2:4", "unstructured:0.7"]:
        p = parse_pattern(s)
        assert parse_pattern(str(p)) == p
        assert p.to_json()["string"] == str(p)
    assert Unstructured(0.6).n_prune_per_row(576) == 345
