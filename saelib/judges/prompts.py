"""The LLM judge's prompts and answer parsing, shared by the OpenAI-compatible, llama.cpp and
local back-ends.

Why one module: the paper's two scores come from gpt-4o-mini reading SAEBench's AutoInterp prompts
(protocol §3) and AxBench's three "impartial judge" templates (protocol §4). A local model or any
other server must read prompts with the *same meaning, scales and parsing rules*, so the wording and
the parsers live here once and the three chat back-ends inherit :class:`PromptedJudge`.

The wording is our own; what is kept from the originals:

* Explanation (SAEBench): documents shown from most to least activating, activating tokens wrapped
  in ``<< >>``, newlines shown as ``↵``; one short sentence (≤ 20 words) of the form
  "This neuron activates on ..."; the parsed explanation is the text after the last
  "activates on", trailing full stop removed.
* Detection (SAEBench): numbered, unmarked documents; the answer is a comma-separated list of
  document numbers or "None". Parsing follows SAEBench: strip, drop a trailing full stop, treat
  "and" as a comma and "None" as nothing; any remaining piece that is not a whole number makes the
  answer unparsable. SAEBench then drops the latent; our interface returns a list, so an
  unparsable answer predicts *no* window fires and is counted in ``usage.extra``.
* Ratings (AxBench): concept presence, instruction relatedness and fluency, each on 0–2 with
  AxBench's anchors, the judge first explains briefly and ends with ``Rating: [[x]]``. Parsing
  follows AxBench: take the text after the last "Rating:", its first line, drop brackets, a
  trailing full stop, quotes and asterisks, read a number; unparsable or outside [0, 2] counts 0.
  Our ratings are integers (``Ratings`` holds ints), so a non-integer number such as 1.5 is off
  the 0/1/2 scale and also counts 0.
"""

from __future__ import annotations

import re
import threading
from abc import abstractmethod
from dataclasses import dataclass
from typing import Sequence

from saelib.judges.base import Judge, MarkedWindow, RatingItem, Ratings

#: A chat request: a list of {"role": ..., "content": ...} messages.
Messages = list[dict[str, str]]

#: The three rating kinds, in the order of the ``Ratings`` fields.
RATING_KINDS = ("concept", "instruction", "fluency")

EXPLAIN_SYSTEM = (
    "We are studying the latents of a sparse autoencoder trained on a language model. A latent "
    "responds to a particular token, word, substring or concept in short pieces of text. Below are "
    "text excerpts on which the latent fires, listed from the strongest activation to the weakest; "
    "the tokens where it fires are wrapped in << and >>. Read what the marked parts have in common "
    "and describe in one sentence what the latent responds to. Do not be overly specific: some "
    "latents respond to one exact word or substring, others to every word of a passage about a "
    "topic, and your description should cover most of the marked tokens rather than one of them. "
    "Mention capitalisation or punctuation only if it matters. Use at most 20 words, no "
    "formatting, no long lists of words. Answer in the form \"This neuron activates on ...\"."
)

DETECT_SYSTEM = (
    "We are studying the latents of a sparse autoencoder trained on a language model. A latent "
    "responds to a particular token, word, substring or concept in short pieces of text. You get a "
    "short description of what one latent responds to, then {n} numbered text excerpts in random "
    "order. List the numbers of the excerpts in which you expect the latent to fire at least once, "
    "on any of their tokens, as a comma-separated list such as \"{example}\". Do not read the "
    "description too narrowly. If you expect it to fire on none of them, answer \"None\". Answer "
    "with the comma-separated numbers or the word \"None\" and nothing else."
)

CONCEPT_TEMPLATE = """[System]
Act as an impartial judge. Decide whether the concept given below appears in the text fragment \
given below. Judge only whether the concept is clearly present; ignore grammar and logical \
coherence.

First explain briefly whether and where the concept appears in the fragment, pointing out any \
reference to it and saying if the reference is minimal or awkward. Then rate the concept's \
presence from 0 to 2: 0 means the concept does not appear at all, 1 means it appears only \
minimally or awkwardly, 2 means it is fully and naturally worked into the fragment. Give the \
rating in exactly this form: "Rating: [[score]]".

[Concept Start]
{concept}
[Concept End]

[Fragment Start]
{sentence}
[Fragment End]
"""

INSTRUCTION_TEMPLATE = """[System]
Act as an impartial judge. Decide how closely the text fragment given below is related to the \
instruction given below. Judge only the topical relatedness; ignore grammar, coherence and how \
informative the fragment is.

First explain briefly whether the fragment is related to the instruction, pointing out the parts \
that relate to it. Then rate the relatedness from 0 to 2: 0 means the fragment is unrelated to the \
instruction, 1 means it is related only loosely or indirectly, 2 means it is clearly and directly \
related. Give the rating in exactly this form: "Rating: [[score]]".

[Instruction Start]
{instruction}
[Instruction End]

[Fragment Start]
{sentence}
[Fragment End]
"""

FLUENCY_TEMPLATE = """[System]
Act as an impartial judge. Rate the fluency of the text fragment given below. Judge only fluency; \
ignore whether it is complete, relevant, consistent with any wider context or informative.

First describe briefly how fluent the fragment is, noting unnatural wording, awkward transitions, \
grammatical errors or repetition that make it harder to read. Then rate its fluency from 0 to 2: \
0 means it is not fluent and very unnatural (for example incomprehensible or repetitive), 1 means \
it is fairly fluent but has noticeable errors or awkward wording, 2 means it is fluent and nearly \
perfect. Give the rating in exactly this form: "Rating: [[score]]".

[Fragment Start]
{sentence}
[Fragment End]
"""


def window_text(window: MarkedWindow, mark: bool) -> str:
    """A window as the LLM sees it (SAEBench ``Example.to_str``): marked tokens wrapped in << >>,
    replacement characters dropped, newlines shown as ↵."""
    if mark and window.marked and len(window.marked) != len(window.tokens):
        raise ValueError(f"window has {len(window.tokens)} tokens but {len(window.marked)} marks")
    pieces = []
    for i, tok in enumerate(window.tokens):
        on = mark and bool(window.marked) and window.marked[i]
        pieces.append(f"<<{tok}>>" if on else tok)
    return "".join(pieces).replace("\ufffd", "").replace("\n", "↵")


def explain_messages(windows: Sequence[MarkedWindow]) -> Messages:
    """The explanation request: windows sorted from the strongest peak down, marks shown."""
    if not windows:
        raise ValueError("explain needs at least one window, got none")
    order = sorted(range(len(windows)), key=lambda i: -max(windows[i].acts, default=0.0))
    docs = "\n".join(f"{n + 1}. {window_text(windows[i], mark=True)}" for n, i in enumerate(order))
    return [
        {"role": "system", "content": EXPLAIN_SYSTEM},
        {"role": "user", "content": f"The excerpts where the latent fires:\n\n{docs}"},
    ]


def detection_example(n_windows: int) -> list[int]:
    """The window numbers (1-based) of the example answer in the detection prompt: fixed ("2, 5,
    7", those not above ``n_windows``) rather than random as in SAEBench, so that the request, and
    therefore the cache key, is deterministic. A judge that answers with exactly these numbers has
    likely copied the example (the judge stage counts such answers)."""
    return [i for i in (2, 5, 7) if i <= n_windows] or [1]


def detect_messages(explanation: str, windows: Sequence[MarkedWindow]) -> Messages:
    """The detection request: windows in the order given (the caller shuffles), unmarked, with
    :func:`detection_example` as the example answer."""
    if not windows:
        raise ValueError("detect needs at least one window, got none")
    n = len(windows)
    example = ", ".join(str(i) for i in detection_example(n))
    docs = "\n".join(f"{i + 1}. {window_text(w, mark=False)}" for i, w in enumerate(windows))
    return [
        {"role": "system", "content": DETECT_SYSTEM.format(n=n, example=example)},
        {"role": "user", "content": (f"The description: this neuron fires on {explanation}.\n\n"
                                     f"The excerpts:\n\n{docs}")},
    ]


def rating_messages(item: RatingItem, kind: str) -> Messages:
    """One AxBench-style rating request (a single user message, as AxBench sends)."""
    if kind == "concept":
        text = CONCEPT_TEMPLATE.format(concept=item.concept, sentence=item.output)
    elif kind == "instruction":
        text = INSTRUCTION_TEMPLATE.format(instruction=item.instruction, sentence=item.output)
    elif kind == "fluency":
        text = FLUENCY_TEMPLATE.format(sentence=item.output)
    else:
        raise ValueError(f"unknown rating kind {kind!r}; valid: {', '.join(RATING_KINDS)}")
    return [{"role": "user", "content": text}]


def parse_explanation(answer: str) -> str:
    """SAEBench: the text after the last "activates on", without a trailing full stop."""
    return answer.split("activates on")[-1].strip().rstrip(".").strip()


def parse_detection(answer: str, n_windows: int) -> list[int] | None:
    """SAEBench's parser; returns 0-based indices in range, or None if the answer is unparsable.

    Numbers outside 1..n_windows name no window and are dropped; duplicates count once.
    """
    pieces = (answer.strip().rstrip(".").replace("and", ",").replace("None", "").split(","))
    pieces = [p.strip() for p in pieces if p.strip()]
    if not all(p.isdecimal() for p in pieces):  # not isdigit: "²" is a digit int() rejects
        return None
    return sorted({int(p) - 1 for p in pieces if 1 <= int(p) <= n_windows})


_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)$")


def rating_value(answer: str) -> float | None:
    """The number after the last "Rating:" (AxBench's clean-up), or None if there is none."""
    if "Rating:" not in answer:
        return None
    text = answer.split("Rating:")[-1].strip().split("\n")[0].strip()
    text = text.replace("[", "").replace("]", "")
    text = text.rstrip(".").strip('"').strip("'").strip("*").strip()
    return float(text) if _NUMBER.match(text) else None


def parse_rating(answer: str) -> int:
    """AxBench's rule: unparsable, or a number not in {0, 1, 2}, counts 0."""
    value = rating_value(answer)
    return int(value) if value in (0.0, 1.0, 2.0) else 0


@dataclass(frozen=True)
class Completion:
    """One chat answer and its token counts (0 where the server did not report them)."""

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


class PromptedJudge(Judge):
    """A judge that asks a chat model the prompts above; subclasses only say how to complete.

    ``complete(requests)`` receives a list of (messages, max_tokens) and returns one
    :class:`Completion` per request in the same order; it is responsible for usage accounting.
    """

    def __init__(self, max_tokens_explanation: int = 60, max_tokens_detection: int = 60,
                 max_tokens_rating: int = 512) -> None:
        super().__init__()
        for name, v in (("max_tokens_explanation", max_tokens_explanation),
                        ("max_tokens_detection", max_tokens_detection),
                        ("max_tokens_rating", max_tokens_rating)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        self.max_tokens_explanation = max_tokens_explanation
        self.max_tokens_detection = max_tokens_detection
        self.max_tokens_rating = max_tokens_rating
        self._usage_lock = threading.Lock()
        self.usage.extra.setdefault("unparsable_detections", 0)
        self.usage.extra.setdefault("unparsable_ratings", 0)

    @abstractmethod
    def complete(self, requests: Sequence[tuple[Messages, int]]) -> list[Completion]:
        """Answer each (messages, max_tokens) request; same order as given."""

    def _count(self, key: str, n: int = 1) -> None:
        with self._usage_lock:
            self.usage.extra[key] = self.usage.extra.get(key, 0) + n

    def explain(self, windows: Sequence[MarkedWindow]) -> str:
        return self.explain_many([windows])[0]

    def explain_many(self, batches: Sequence[Sequence[MarkedWindow]]) -> list[str]:
        """Explain many latents at once (the back-end may run the requests concurrently)."""
        reqs = [(explain_messages(ws), self.max_tokens_explanation) for ws in batches]
        return [parse_explanation(c.text) for c in self.complete(reqs)]

    def detect(self, explanation: str, windows: Sequence[MarkedWindow]) -> list[int]:
        return self.detect_many([(explanation, windows)])[0]

    def detect_many(self, cases: Sequence[tuple[str, Sequence[MarkedWindow]]]) -> list[list[int]]:
        """Detection for many (explanation, windows) cases at once; see :func:`parse_detection`."""
        reqs = [(detect_messages(e, ws), self.max_tokens_detection) for e, ws in cases]
        out = []
        for (_, ws), c in zip(cases, self.complete(reqs)):
            parsed = parse_detection(c.text, len(ws))
            if parsed is None:
                self._count("unparsable_detections")
                parsed = []
            out.append(parsed)
        return out

    def rate(self, items: Sequence[RatingItem]) -> list[Ratings]:
        reqs = [(rating_messages(it, k), self.max_tokens_rating)
                for it in items for k in RATING_KINDS]
        answers = self.complete(reqs)
        values = []
        for c in answers:
            if rating_value(c.text) not in (0.0, 1.0, 2.0):
                self._count("unparsable_ratings")
            values.append(parse_rating(c.text))
        return [Ratings(*values[3 * i:3 * i + 3]) for i in range(len(items))]

