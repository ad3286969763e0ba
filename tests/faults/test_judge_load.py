"""The OpenAI-compatible judge under load (issue "Reliability", item 5): hundreds of concurrent
requests against a real HTTP server on 127.0.0.1 that throttles (429) and fails (500) some of
them. The judge must keep at most ``max_concurrency`` requests in flight, lose no item (every
rating is the one its own prompt asked for), retry a transient failure until it succeeds, and give
up on a request after exactly ``max_retries`` + 1 attempts.
"""

from __future__ import annotations

import zlib

import pytest
from test_judges_openai import judge_for, key, server  # noqa: F401  (tests/ is on sys.path; fixtures)

from saelib.judges import RatingItem, Ratings
from saelib.judges.openai import JudgeRequestError

N_ITEMS = 200


def answer_for(text: str) -> str:
    """Each rating depends on the item's own prompt, so a swapped or lost answer is visible."""
    digit = zlib.crc32(text.encode()) % 3
    return f"Judged.\nRating: [[{digit}]]"


def expected(item: RatingItem) -> Ratings:
    from saelib.judges.prompts import rating_messages

    values = [zlib.crc32(rating_messages(item, kind)[-1]["content"].encode()) % 3
              for kind in ("concept", "instruction", "fluency")]
    return Ratings(*values)



def test_hundreds_of_requests_with_throttling_keep_the_bound_and_lose_nothing(server, key):
    def plan(body, attempt):
        text = body["messages"][-1]["content"]
        h = zlib.crc32(text.encode())
        if h % 4 == 0 and attempt == 1:
            return ("status", 429, [("Retry-After", "0")])
        if h % 4 == 1 and attempt <= 2:
            return ("status", 500)
        return ("text", answer_for(text))

    server.plan = plan
    server.answer_delay_s = 0.002
    items = [RatingItem(f"concept {i % 17}", f"Instruction number {i}.", f"Output {i} " * (1 + i % 5))
             for i in range(N_ITEMS)]
    judge = judge_for(server, key, max_concurrency=8, max_retries=3)
    got = judge.rate(items)
    assert got == [expected(it) for it in items]  # none lost, none swapped
    assert 1 < server.max_in_flight <= 8
    firsts = len(server.attempts)
    assert firsts == 3 * N_ITEMS  # every prompt reached the server
    retries = sum(a - 1 for a in server.attempts.values())
    n429 = sum(1 for k in server.attempts if zlib.crc32(eval_text(k).encode()) % 4 == 0)
    n500 = sum(1 for k in server.attempts if zlib.crc32(eval_text(k).encode()) % 4 == 1)
    assert retries == n429 + 2 * n500 and max(server.attempts.values()) <= 3
    assert len(server.requests) == firsts + retries


def eval_text(key: str) -> str:
    import json

    return json.loads(key)[-1]["content"]


def test_a_request_that_always_fails_is_tried_exactly_max_retries_plus_one_times(server, key):
    server.plan = lambda body, attempt: ("status", 500)
    judge = judge_for(server, key, max_concurrency=4, max_retries=2)
    with pytest.raises(JudgeRequestError, match="3 attempts"):
        judge.rate([RatingItem("cats", "Write about pets.", "Cats.")])
    assert max(server.attempts.values()) == 3 and len(server.requests) <= 3 * 3
