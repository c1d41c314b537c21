"""The answer language: ``<think>…</think><answer>…</answer>`` with boxes.

An answer reads ``Yes.`` followed by one ``{'bbox_2d': [x1, y1, x2, y2], 'label': '...'}``
per defect, or ``No.``; boxes are integer pixels of the model grid. :func:`format_answer`
writes that shape (SFT targets), :func:`parse_answer` reads it back from whatever a model
wrote (rewards, evaluation, serving).

Model output reaches the parser from the network, so it never raises and runs in linear
time: tags are located with ``str.find`` and counted with ``str.count``; boxes are read by
a hand-written scanner (:class:`_BoxScanner`) whose cursor only moves forward, over at
most :data:`MAX_SCAN_CHARS` characters of the answer block. No regular expressions.

Parsing is lenient (Python-literal or JSON dicts, single or double quotes, ``bbox_2d`` or
``bbox`` keys, bare ``[x1, y1, x2, y2]`` lists, swapped corners, ``yes``/``YES``/``Yes,``);
``format_ok`` is strict and is what the ``format`` reward teaches:

- one ``<think>`` block, then one ``<answer>`` block, with only whitespace around them
  (without ``require_think`` the think block may be absent);
- the answer starts with ``Yes`` or ``No`` (this exact case);
- after ``Yes``: at least one box, every box a closed dict with a 4-number box and a
  string label that survives clipping; after ``No``: no box at all;
- the answer block is at most :data:`MAX_SCAN_CHARS` long.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from mmrad.task.geometry import Box, Size, clip_box

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
YES, NO = "Yes", "No"

BOX_KEYS = frozenset({"bbox_2d", "bbox"})
LABEL_KEYS = frozenset({"label"})
DECISION_WORDS = {"yes": True, "no": False}

MAX_SCAN_CHARS = 65_536
"""Boxes are looked for in this many leading characters of the answer block; a real
answer is a few hundred characters, and the bound keeps adversarial input cheap."""

MAX_NUMBER_CHARS = 32
"""Longer digit runs are not coordinates."""

GENERIC_REASONING = {
    True: (
        "Compared with a normal sample of the product, the query image shows regions "
        "that deviate from the expected appearance; these regions are the anomalies."
    ),
    False: (
        "Compared with a normal sample of the product, the query image matches the "
        "expected appearance everywhere; the sample is normal."
    ),
}
"""The think block of an answer made from a record without reasoning text (SFT targets,
GRPO's ground-truth and flipped samples); the no-reasoning variant has no think block."""


def has_reasoning(text: str | None) -> bool:
    """Whether a record's reasoning says anything; missing or blank reasoning is what
    :data:`GENERIC_REASONING` stands in for."""
    return bool(text and text.strip())


_DECISION_NOISE = " \t\r\n*\"'`([:"  # what may precede a decision word: markdown, quotes
_TOKEN_NOISE = " \t\r\n\u0120\u010a\u2581>"  # whitespace, BPE markers Ġ Ċ ▁, tag remnant


@dataclass(frozen=True)
class Verdict:
    """What an answer says. ``boxes`` are original pixels; ``labels`` align with them."""

    decision: bool | None
    boxes: list[Box] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    reasoning: str | None = None
    format_ok: bool = False
    score: float | None = None  # P(Yes), filled by evaluation


# --------------------------------------------------------------------------- formatting


def format_answer(
    is_anomalous: bool,
    boxes: Sequence[Sequence[float]],
    labels: Sequence[str],
    reasoning: str | None,
) -> str:
    """The answer string for a record; ``boxes`` as they appear in answers (model grid).

    Without ``reasoning`` it is the answer block alone (the no-reasoning variant).
    """
    if len(boxes) != len(labels):
        raise ValueError(f"got {len(boxes)} boxes but {len(labels)} labels")
    if is_anomalous:
        items = ", ".join(
            _format_item(box, label) for box, label in zip(boxes, labels, strict=True)
        )
        body = f"{YES}. {items}" if items else f"{YES}."
    elif boxes:
        raise ValueError(f"a normal image has no boxes, got {len(boxes)}")
    else:
        body = f"{NO}."
    answer = f"{ANSWER_OPEN}{body}{ANSWER_CLOSE}"
    return answer if reasoning is None else f"{THINK_OPEN}{reasoning}{THINK_CLOSE}{answer}"


def _format_item(box: Sequence[float], label: str) -> str:
    coords = ", ".join(_format_number(v) for v in box)
    return f"{{'bbox_2d': [{coords}], 'label': {label!r}}}"


def _format_number(value: float) -> str:
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


# ------------------------------------------------------------------------------ parsing


def parse_answer(
    text: str,
    scale: tuple[float, float] = (1.0, 1.0),
    size: Size | None = None,
    *,
    require_think: bool = True,
) -> Verdict:
    """Read a model's answer. ``scale`` multiplies x and y (model grid → original pixels);
    ``size = (width, height)`` clips boxes to the image. Boxes left with no area are
    dropped. ``require_think=False`` is for the no-reasoning prompt variant: ``format_ok``
    then checks the answer block alone. Never raises; linear time."""
    if not isinstance(text, str):
        return Verdict(decision=None)
    blocks = _split_blocks(text)
    content = text[blocks.content_start : blocks.content_end]
    scanner = _BoxScanner(content[:MAX_SCAN_CHARS])
    scanner.run()
    boxes, labels = [], []
    for item in scanner.items:
        box = _to_original_pixels(item.coords, scale, size)
        if box is not None:
            boxes.append(box)
            labels.append(item.label)
    format_ok = (
        _blocks_well_formed(text, require_think)
        and len(content) <= MAX_SCAN_CHARS
        and _content_well_formed(content, scanner, kept=len(boxes))
    )
    return Verdict(
        decision=read_decision(content),
        boxes=boxes,
        labels=labels,
        reasoning=blocks.reasoning,
        format_ok=format_ok,
    )


@dataclass(frozen=True)
class _Blocks:
    reasoning: str | None
    content_start: int  # the answer block's content, or what follows the think block
    content_end: int
    tagged: bool  # an <answer> tag was found


def _split_blocks(text: str) -> _Blocks:
    """Locate the think block and the answer content, forgiving missing closing tags.

    An unclosed think block ends at the next ``<answer>``; an unclosed answer block runs
    to the end (truncated output); without ``<answer>`` the content is whatever follows
    the think block, so untagged answers of generalist models are still read.
    """
    reasoning = None
    after_think = 0
    think_open = text.find(THINK_OPEN)
    if think_open != -1:
        start = think_open + len(THINK_OPEN)
        think_close = text.find(THINK_CLOSE, start)
        if think_close != -1:
            reasoning, after_think = text[start:think_close], think_close + len(THINK_CLOSE)
        else:
            answer_open = text.find(ANSWER_OPEN, start)
            after_think = answer_open if answer_open != -1 else len(text)
            reasoning = text[start:after_think]
        reasoning = reasoning.strip()
    answer_open = text.find(ANSWER_OPEN, after_think)
    if answer_open == -1:
        return _Blocks(reasoning, after_think, len(text), tagged=False)
    start = answer_open + len(ANSWER_OPEN)
    answer_close = text.find(ANSWER_CLOSE, start)
    end = answer_close if answer_close != -1 else len(text)
    return _Blocks(reasoning, start, end, tagged=True)


def _blocks_well_formed(text: str, require_think: bool) -> bool:
    """One think block (optional unless required) then one answer block, nothing else."""
    body = text.strip()
    if body.startswith(THINK_OPEN):
        if body.count(THINK_OPEN) != 1 or body.count(THINK_CLOSE) != 1:
            return False
        body = body[body.find(THINK_CLOSE) + len(THINK_CLOSE) :].lstrip()
    elif require_think or THINK_OPEN in body or THINK_CLOSE in body:
        return False
    return (
        body.startswith(ANSWER_OPEN)
        and body.endswith(ANSWER_CLOSE)
        and body.count(ANSWER_OPEN) == 1
        and body.count(ANSWER_CLOSE) == 1
    )


def _content_well_formed(content: str, scanner: _BoxScanner, kept: int) -> bool:
    """Starts with ``Yes``/``No``; well-formed boxes after Yes (at least one), none after No."""
    word = _leading_letters(content.lstrip())
    found = len(scanner.items) + scanner.malformed
    if word == YES:
        all_well_formed = all(item.well_formed for item in scanner.items)
        return kept >= 1 and kept == found and all_well_formed
    return word == NO and found == 0


def read_decision(content: str) -> bool | None:
    """``True`` for an answer opening with yes (any case, any punctuation after), ``False``
    for no, ``None`` otherwise. Quotes and markdown before the word are skipped."""
    return DECISION_WORDS.get(_leading_letters(content.lstrip(_DECISION_NOISE)).lower())


def _leading_letters(text: str, limit: int = 4) -> str:
    """The leading run of letters, read no further than ``limit`` characters (enough to
    tell ``Yes`` from ``Yesterday`` and ``No`` from ``None``)."""
    end = 0
    while end < min(limit, len(text)) and text[end].isalpha():
        end += 1
    return text[:end]


def _to_original_pixels(
    coords: Sequence[float], scale: tuple[float, float], size: Size | None
) -> Box | None:
    """Scale, put corners in order, clip; ``None`` for a box with no area left."""
    if not all(math.isfinite(v) for v in coords):
        return None
    sx, sy = scale
    x1, y1, x2, y2 = coords[0] * sx, coords[1] * sy, coords[2] * sx, coords[3] * sy
    box = [min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)]
    if size is not None:
        box = clip_box(box, size)
    if not (box[0] < box[2] and box[1] < box[3]):
        return None
    return [float(v) for v in box]


@dataclass(frozen=True)
class _Item:
    coords: list[float]
    label: str
    well_formed: bool  # a closed dict with a box and a string label


class _Invalid:
    """Marks a value the scanner could not read."""


_INVALID = _Invalid()


class _BoxScanner:
    """Finds boxes in one forward pass over ``text``.

    Every method starts at ``self.pos`` and only moves it forward; a failed dict or list
    resumes the scan where it failed, so nothing is read twice and the scan is linear.
    A dict counts only once closed by ``}`` (a box cut off by truncation is dropped);
    a ``[`` that does not hold exactly four numbers is skipped (e.g. a JSON array of
    dicts, whose dicts are then read one by one).
    """

    def __init__(self, text: str):
        self.text = text
        self.pos = 0
        self.items: list[_Item] = []
        self.malformed = 0  # dicts that started but did not yield a box

    def run(self) -> None:
        text, end = self.text, len(self.text)
        while self.pos < end:
            char = text[self.pos]
            if char == "{":
                self._dict_item()
            elif char == "[":
                self._bare_item()
            else:
                self.pos += 1

    def _bare_item(self) -> None:
        numbers = self._number_list()
        if numbers is not None and len(numbers) == 4:
            self.items.append(_Item(numbers, "", well_formed=False))

    def _dict_item(self) -> None:
        self.pos += 1  # "{"
        coords: object = None
        label: object = None
        while True:
            self._skip_whitespace()
            if self._take("}"):
                break
            key = self._key()
            self._skip_whitespace()
            if key is None or not self._take(":"):
                self.malformed += 1
                return
            self._skip_whitespace()
            value = self._value()
            if value is _INVALID:
                self.malformed += 1
                return
            if key in BOX_KEYS:
                coords = value
            elif key in LABEL_KEYS:
                label = value
            self._skip_whitespace()
            if self._take(","):
                continue
            if self._take("}"):
                break
            self.malformed += 1
            return
        if not (isinstance(coords, list) and len(coords) == 4):
            self.malformed += 1
            return
        has_label = isinstance(label, str)
        self.items.append(_Item(coords, label.strip() if has_label else "", has_label))

    def _key(self) -> str | None:
        if self._peek() in ("'", '"'):
            return self._string()
        start = self.pos
        while self.pos < len(self.text) and _is_word_char(self.text[self.pos]):
            self.pos += 1
        return self.text[start : self.pos] or None

    def _value(self) -> object:
        char = self._peek()
        if char in ("'", '"'):
            value = self._string()
        elif char == "[":
            value = self._number_list()
        else:
            value = self._number()
        return _INVALID if value is None else value

    def _number_list(self) -> list[float] | None:
        self.pos += 1  # "["
        numbers: list[float] = []
        self._skip_whitespace()
        if self._take("]"):
            return numbers
        while True:
            self._skip_whitespace()
            number = self._number()
            if number is None:
                return None
            numbers.append(number)
            self._skip_whitespace()
            if self._take("]"):
                return numbers
            if not self._take(","):
                return None

    def _number(self) -> float | None:
        """``[+-]digits[.digits][e[+-]digits]``; ``None`` (position moved past what was
        read) for anything else."""
        start = self.pos
        self._take_sign()
        digits = self._digits()
        if self._take("."):
            digits += self._digits()
        if digits and self._peek() in ("e", "E"):
            self.pos += 1
            self._take_sign()
            if not self._digits():
                return None
        if not digits or self.pos - start > MAX_NUMBER_CHARS:
            return None
        return float(self.text[start : self.pos])

    def _take_sign(self) -> None:
        if not self._take("-"):
            self._take("+")

    def _digits(self) -> int:
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] in "0123456789":
            self.pos += 1
        return self.pos - start

    def _string(self) -> str | None:
        """A quoted string with backslash escapes; ``None`` when it is not closed."""
        text, quote = self.text, self.text[self.pos]
        start = self.pos
        self.pos += 1
        escaped = False
        while self.pos < len(text):
            char = text[self.pos]
            self.pos += 1
            if char == "\\":
                escaped = True
                self.pos += 1
            elif char == quote:
                return _unescape(text[start : self.pos], escaped)
        return None

    def _skip_whitespace(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def _peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def _take(self, char: str) -> bool:
        if self._peek() == char:
            self.pos += 1
            return True
        return False


def _is_word_char(char: str) -> bool:
    return char.isalnum() or char == "_"


def _unescape(literal: str, escaped: bool) -> str:
    """The value of a quoted literal (quotes included); escapes read as Python reads them,
    the raw text when Python cannot read it."""
    if escaped:
        try:
            value = ast.literal_eval(literal)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            value = None
        if isinstance(value, str):
            return value
    return literal[1:-1]


# ------------------------------------------------------------------- first-token scores


def yes_probability(first_token_logprobs: Mapping[str, float]) -> float | None:
    """P(Yes) normalised over Yes and No, from the top log-probs of the first answer token.

    Token variants are summed: any token that begins with "yes" (or "no"), in any case,
    after leading whitespace and the byte-level BPE markers (``Ġ``, ``Ċ``, ``▁``). ``None``
    when no variant of either word is among the log-probs.
    """
    yes, no = [], []
    for token, logprob in first_token_logprobs.items():
        word = token.lstrip(_TOKEN_NOISE).lower()
        if word.startswith("yes"):
            yes.append(logprob)
        elif word.startswith("no"):
            no.append(logprob)
    log_yes, log_no = _logsumexp(yes), _logsumexp(no)
    if log_yes == log_no == -math.inf:
        return None
    return _sigmoid(log_yes - log_no)


def _logsumexp(values: Sequence[float]) -> float:
    top = max(values, default=-math.inf)
    if top == -math.inf:
        return -math.inf
    return top + math.log(sum(math.exp(v - top) for v in values))


def _sigmoid(x: float) -> float:
    """``1 / (1 + exp(-x))`` without overflow at either end."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def answer_token_index(tokens: Sequence[str]) -> int | None:
    """Index of the generated token holding the first non-blank character of the answer
    block (the token whose log-probs give :func:`yes_probability`); ``None`` when the
    output has no answer content. The answer block is found as :func:`parse_answer`
    finds it, so a ``<answer>`` mentioned inside the reasoning is not taken."""
    text = "".join(tokens)
    blocks = _split_blocks(text)
    if not blocks.tagged:
        return None
    rest = text[blocks.content_start :]
    target = blocks.content_start + len(rest) - len(rest.lstrip())
    if target >= len(text):
        return None
    offset = 0
    for index, token in enumerate(tokens):
        offset += len(token)
        if offset > target:
            return index
    return None
