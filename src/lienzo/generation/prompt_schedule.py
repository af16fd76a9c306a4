"""AUTOMATIC1111's prompt editing ``[from:to:when]`` and alternation ``[a|b]``: which text applies at which step.

Pure text, no torch: :func:`prompt_schedule` turns a prompt into A1111's schedule, a list of
``(end_step, text)`` where each text applies up to and including its end step, and the texts are
what the emphasis parser (:mod:`lienzo.generation.prompts`) then encodes. The rules are A1111's
(``modules/prompt_parser.py``, its default "new" timeline, without hires fix):

- ``[from:to:when]`` is ``from`` up to step ``when`` and ``to`` after it; ``[to:when]`` adds ``to``
  after ``when``; ``[from::when]`` removes ``from`` after ``when``. Groups nest.
- ``when`` with a decimal point is a fraction of the steps (``0.25``, ``.5``, ``1.0``), without one
  a step number (``10``): the step is ``min(steps, int(value))``, ``value`` being the fraction
  times the steps, truncated toward zero (``0.25`` of 10 steps is step 2). A fraction above 1 (A1111
  means the hires pass by it) is therefore the last step: the ``from`` text throughout.
  A step below 1 adds no schedule point and selects ``to`` throughout.
- ``[a|b|c]`` picks option ``(step - 1) % n`` at each step 1..steps; options may be empty
  (``[fe|]male``) and may hold more groups, which see the same step number.
- Schedule points are the steps every ``when`` in the prompt resolves to (those ≥ 1, even in
  branches never shown), every step when there is an alternation, and the last step; consecutive
  equal texts are merged (A1111 keeps them apart; the conditioning is the same).
- Everything else stays as written, for the emphasis parser: ``(x:1.2)``, plain ``[x]``
  (de-emphasis), ``BREAK``, ``\\[`` and other escapes. A bracket group that is not well formed is
  literal text; a ``|`` outside an alternation, or a trailing lone backslash, makes A1111's grammar
  reject the whole prompt, and then the whole prompt is literal (no editing at all).

A1111 looks a schedule up with the sampler's 0-based step counter against these 1-based end steps
(first entry whose end step is ≥ the counter), so ``[a:b:5]`` shows ``b`` from the 7th model call
on: :func:`schedule_index` does the same.

Composable prompts (A1111's ``get_multicond_prompt_list``) come before all of this:
:func:`split_subprompts` cuts ``a cat AND a dog:1.2`` into subprompts with weights, and each
subprompt then gets its own schedule. Only the positive prompt is cut.
"""

import re
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass

# Lark's SIGNED_NUMBER, as A1111's grammar takes ``when``; then optional spaces and the closing bracket.
_WHEN = re.compile(r"\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*\]")
# Plain text inside a prompt: anything but brackets, colons and pipes, or a backslash and the
# character it escapes (not a newline, as in the grammar's regular expression).
_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+")
_STRAY = "[]():"  # characters the grammar lets stand as text at the top level, outside any group
# Composable prompts: "AND" in capitals with a word boundary on each side ("ANDROID", "sAND" and "and"
# stay text; "cat,AND dog" splits).
_AND = re.compile(r"\bAND\b")
# A subprompt: its text, then optionally ":weight" (spaces allowed around the colon) and trailing spaces,
# which are not part of the text; nor are leading spaces (A1111 keeps them, but the CLIP tokenizer drops
# them, and without them "a AND a" is one text to encode). The weight is a signed decimal without an
# exponent: 2, 1., .5, -0.3, +1.
_SUBPROMPT = re.compile(r"\s*(.*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*", re.DOTALL)


@dataclass(frozen=True)
class _Edit:
    before: "tuple[_Node, ...]"
    after: "tuple[_Node, ...]"
    when: int  # resolved to a step


@dataclass(frozen=True)
class _Alternate:
    options: "tuple[tuple[_Node, ...], ...]"


_Node = str | _Edit | _Alternate


class _Rejected(Exception):
    """A1111's grammar cannot parse the prompt at all."""


class _Parser:
    """Recursive descent over A1111's grammar. A group is whatever parses first of: emphasis ``[x]``
    or ``(x)`` / ``(x:y)`` (kept as text), editing, alternation; inside a group anything that does not
    parse fails the group, at the top level it leaves its opening bracket as literal text."""

    def __init__(self, text: str, steps: int):
        self.text, self.steps = text, steps

    def parse(self) -> list[_Node]:
        nodes: list[_Node] = []
        pos, text = 0, self.text
        while pos < len(text):
            char = text[pos]
            if char in "[(":
                group = self._square(pos) if char == "[" else self._round(pos)
                if group is not None:
                    parsed, pos = group
                    nodes.extend(parsed)
                    continue
            if char in _STRAY:
                nodes.append(char)
                pos += 1
                continue
            plain = _PLAIN.match(text, pos)
            if plain is None:  # "|" outside an alternation, or a backslash at the very end
                raise _Rejected
            nodes.append(plain.group(0))
            pos = plain.end()
        return nodes

    def _prompt(self, pos: int) -> tuple[list[_Node], int]:
        """The longest run of text and groups from ``pos``; stops at ``] ) : |`` or a group that fails."""
        nodes: list[_Node] = []
        text = self.text
        while pos < len(text):
            char = text[pos]
            if char in "[(":
                group = self._square(pos) if char == "[" else self._round(pos)
                if group is None:
                    break
                parsed, pos = group
                nodes.extend(parsed)
                continue
            plain = _PLAIN.match(text, pos)
            if plain is None:
                break
            nodes.append(plain.group(0))
            pos = plain.end()
        return nodes, pos

    def _at(self, pos: int) -> str:
        return self.text[pos] if pos < len(self.text) else ""

    def _round(self, pos: int) -> tuple[list[_Node], int] | None:
        """``(x)`` or ``(x:y)``: emphasis, kept as written with any groups inside resolved."""
        inner, pos = self._prompt(pos + 1)
        if self._at(pos) == ")":
            return ["(", *inner, ")"], pos + 1
        if self._at(pos) != ":":
            return None
        weight, pos = self._prompt(pos + 1)
        if self._at(pos) != ")":
            return None
        return ["(", *inner, ":", *weight, ")"], pos + 1

    def _square(self, pos: int) -> tuple[list[_Node], int] | None:
        first, pos = self._prompt(pos + 1)
        char = self._at(pos)
        if char == "]":  # [x]: de-emphasis, kept as written
            return ["[", *first, "]"], pos + 1
        if char == "|":
            options = [tuple(first)]
            while self._at(pos) == "|":
                option, pos = self._prompt(pos + 1)
                options.append(tuple(option))
            if self._at(pos) != "]":
                return None
            return [_Alternate(tuple(options))], pos + 1
        if char != ":":
            return None
        when = _WHEN.match(self.text, pos + 1)
        if when is not None:  # [to:when]
            return [_Edit((), tuple(first), self._step(when.group(1)))], when.end()
        second, pos = self._prompt(pos + 1)
        when = _WHEN.match(self.text, pos + 1) if self._at(pos) == ":" else None
        if when is None:
            return None
        return [_Edit(tuple(first), tuple(second), self._step(when.group(1)))], when.end()

    def _step(self, number: str) -> int:
        value = float(number)
        if "." in number:
            value *= self.steps
        # min(steps, int(value)) as A1111 has it; clamped first so that 1e999 cannot overflow int().
        return int(max(-1.0, min(float(self.steps), value)))


def _points(nodes: Sequence[_Node], steps: int, found: set[int]) -> None:
    for node in nodes:
        if isinstance(node, _Edit):
            if node.when >= 1:
                found.add(node.when)
            _points(node.before, steps, found)
            _points(node.after, steps, found)
        elif isinstance(node, _Alternate):
            found.update(range(1, steps + 1))
            for option in node.options:
                _points(option, steps, found)


def _text_at(nodes: Sequence[_Node], step: int) -> str:
    parts = []
    for node in nodes:
        if isinstance(node, str):
            parts.append(node)
        elif isinstance(node, _Edit):
            parts.append(_text_at(node.before if step <= node.when else node.after, step))
        else:
            parts.append(_text_at(node.options[(step - 1) % len(node.options)], step))
    return "".join(parts)


def prompt_schedule(text: str, steps: int) -> list[tuple[int, str]]:
    """A1111's schedule of ``text`` over ``steps`` steps: ``[(end_step, text), ...]``, each text
    applying up to and including its end step, the last end step being ``steps``. A prompt with no
    editing or alternation gives ``[(steps, text)]``."""
    if "[" not in text:  # no group, so nothing to schedule: the text as given
        return [(steps, text)]
    try:
        nodes = _Parser(text, steps).parse()
    except (_Rejected, RecursionError):  # RecursionError: brackets nested hundreds deep, taken as text
        return [(steps, text)]
    found = {steps}
    _points(nodes, steps, found)
    schedule: list[tuple[int, str]] = []
    for step in sorted(found):
        current = _text_at(nodes, step)
        if schedule and schedule[-1][1] == current:
            schedule[-1] = (step, current)
        else:
            schedule.append((step, current))
    return schedule


def split_subprompts(text: str) -> list[tuple[str, float]]:
    """A1111's composable prompt: ``text`` cut on the word ``AND`` into ``[(subprompt, weight), ...]``.

    Each subprompt loses its spaces at both ends and may end in ``:weight`` (default 1.0); empty
    subprompts (``a AND``, ``AND b``) are kept as the empty prompt, as A1111 keeps them. Repeated subprompts stay repeated (their weights add up in effect). A prompt without ``AND`` is
    returned whole, as given, weight 1.0: no trailing ``:weight`` is read from it, so a plain prompt is
    encoded exactly as before (A1111 would read ``a cat:1.5`` as weight 1.5 even without ``AND``)."""
    parts = _AND.split(text)
    if len(parts) == 1:
        return [(text, 1.0)]
    subprompts = []
    for part in parts:
        match = _SUBPROMPT.fullmatch(part)  # always matches: the lazy text can take everything
        subprompt, weight = match.group(1), match.group(2)
        subprompts.append((subprompt, 1.0 if weight is None else float(weight)))
    return subprompts


def schedule_index(end_steps: Sequence[int], step: int) -> int:
    """Which entry of a schedule applies at the loop's 0-based ``step``: the first whose end step is
    ≥ ``step``, as A1111 looks it up; past the last end step (more model calls than steps, as with
    second-order samplers), the last entry."""
    return min(bisect_left(end_steps, step), len(end_steps) - 1)
