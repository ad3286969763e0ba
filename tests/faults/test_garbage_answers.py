"""A judge answering garbage (issue "Reliability", item 2): whatever text comes back, the parsers
return a value inside the protocol's range or a marked failure, never raise, never invent a rating.

Protocol §3–4: detection answers are window numbers 1..n (or "None"); ratings are 0–2 and anything
unparsable or out of range counts 0.
"""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from saelib.judges.prompts import parse_detection, parse_explanation, parse_rating

#: Text that looks like answers: digits, separators, the rating marker, brackets, junk unicode.
ANSWERS = st.text(alphabet=st.sampled_from(list("0123456789 ,.;-[]*\"'\n:abNoneRating") + ["é", "\x00", "２"]),
                  max_size=60) | st.text(max_size=60)


@settings(max_examples=400, deadline=None)
@given(ANSWERS)
def test_any_rating_answer_is_0_1_or_2(answer):
    assert parse_rating(answer) in (0, 1, 2)


@settings(max_examples=400, deadline=None)
@given(ANSWERS, st.integers(1, 30))
@example("²", 1)  # a digit to str.isdigit, not to int(): once found by hypothesis, kept here
@example("٣, 1", 3)  # Arabic-Indic three: a decimal int() reads
def test_any_detection_answer_is_valid_indices_or_none(answer, n):
    got = parse_detection(answer, n)
    assert got is None or (all(isinstance(i, int) and 0 <= i < n for i in got) and len(set(got)) == len(got))


@settings(max_examples=200, deadline=None)
@given(st.integers(3, 1000))
def test_out_of_range_ratings_count_zero(value):
    assert parse_rating(f"Rating: [[{value}]]") == 0


@settings(max_examples=200, deadline=None)
@given(ANSWERS)
def test_any_explanation_answer_is_a_string(answer):
    assert isinstance(parse_explanation(answer), str)
