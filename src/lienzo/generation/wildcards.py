"""Wildcards and dynamic prompts, as AUTOMATIC1111 users know them from the sd-dynamic-prompts extension.

Pure text, no torch. A template's syntax is resolved into plain prompt text before anything else reads
it (prompt editing, emphasis, LoRA tags):

- ``{red|green|blue}`` picks one option; options may be empty, nest, and hold wildcards.
- ``{2::red|green}``: a number and ``::`` before an option weighs it (here red twice as likely).
- ``{2$$a|b|c}`` picks 2 distinct options joined by ``", "``; ``{1-3$$a|b|c}`` picks 1 to 3 of them
  (``{-2$$...}``: 1 to 2; ``{2-$$...}``: 2 to all); ``{2$$ and $$a|b|c}`` joins with
  `` and ``. A count above the number of options takes them all.
- ``__colour__`` picks a line of ``<wildcard folder>/colour.txt``; ``__animals/cats__`` reads
  ``animals/cats.txt``. Blank lines and lines starting with ``#`` are skipped; a line may hold
  wildcards and variants itself, resolved in turn up to :data:`MAX_DEPTH` files deep.
- ``\\{`` and ``\\}`` are literal braces. Every other backslash pair (``\\(``, ``\\|``, ``\\_``, ``\\\\``)
  is kept as written for the emphasis parser after us, which drops the backslash; so ``\\__x__`` is
  the literal text ``__x__``. Inside a variant, a ``|`` in square brackets is A1111's alternation
  (``{[cat|dog]|bird}`` has two options), and ``|`` or ``}`` outside any variant is plain text.

Random mode draws every choice from one ``random.Random``: the engine seeds it with the image's seed,
so the same seed remakes the same text. Combinatorial mode (:func:`all_prompts`) lists every
combination in order, the first variant changing slowest.
"""

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import combinations, islice
from pathlib import Path
from random import Random

from lienzo.errors import InvalidRequestError

# Wildcard files that name each other (a → b → a) would recurse forever; ten levels is far more than
# anyone's nested lists use (sd-dynamic-prompts' own default limit is also in the tens).
MAX_DEPTH = 10

_WILDCARD = re.compile(r"__([\w\-./]+?)__")
# "{2$$", "{1-3$$", "{-2$$", "{2-$$": how many options to pick; then an optional joiner ending in "$$".
_COUNT = re.compile(r"\s*(\d*)\s*(-?)\s*(\d*)\s*\$\$")
_JOINER = re.compile(r"([^{}|$]*)\$\$")
_WEIGHT = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*::")


@dataclass(frozen=True)
class _Wildcard:
    name: str


@dataclass(frozen=True)
class _Option:
    weight: float
    nodes: "tuple[_Node, ...]"


@dataclass(frozen=True)
class _Variant:
    options: tuple[_Option, ...]
    low: int = 1
    high: int | None = 1  # None: every option
    joiner: str = ", "


_Node = str | _Wildcard | _Variant


class _Parser:
    """Recursive descent: a sequence is text, wildcards and variants; a variant is options between
    ``{`` and ``}``, each a sequence."""

    def __init__(self, text: str, field_name: str, where: str):
        self.text, self.field, self.where, self.pos = text, field_name, where, 0

    def parse(self) -> tuple["_Node", ...]:
        return self._sequence(top=True)

    def _sequence(self, top: bool) -> tuple["_Node", ...]:
        text, nodes, buffer, square = self.text, [], [], 0

        def flush() -> None:
            if buffer:
                nodes.append("".join(buffer))
                buffer.clear()

        while self.pos < len(text):
            char = text[self.pos]
            if char == "\\" and self.pos + 1 < len(text):
                pair = text[self.pos : self.pos + 2]
                buffer.append(pair[1] if pair[1] in "{}" else pair)
                self.pos += 2
                continue
            if char == "{":
                flush()
                nodes.append(self._variant())
                continue
            if not top:
                if char == "}" or (char == "|" and not square):
                    break  # the variant consumes it
                square += char == "["
                square -= char == "]" and square > 0
            wildcard = _WILDCARD.match(text, self.pos) if char == "_" else None
            if wildcard is not None:
                flush()
                nodes.append(_Wildcard(wildcard.group(1)))
                self.pos = wildcard.end()
                continue
            buffer.append(char)
            self.pos += 1
        flush()
        return tuple(nodes)

    def _variant(self) -> _Variant:
        start = self.pos
        self.pos += 1
        low, high, joiner = 1, 1, ", "
        count = _COUNT.match(self.text, self.pos)
        if count is not None and (count.group(1) or count.group(3)):
            first, dash, last = count.groups()
            if dash:
                low, high = int(first or 1), int(last) if last else None
            else:
                low = high = int(first)
            self.pos = count.end()
            custom = _JOINER.match(self.text, self.pos)
            if custom is not None:
                joiner, self.pos = custom.group(1), custom.end()
        options = []
        while True:
            weight = _WEIGHT.match(self.text, self.pos)
            if weight is not None:
                self.pos = weight.end()
            options.append(_Option(float(weight.group(1)) if weight else 1.0, self._sequence(top=False)))
            if self.pos >= len(self.text):
                raise InvalidRequestError(
                    self.field, f"the {{ at character {start + 1}{self.where} is never closed; write \\{{ for a literal brace"
                )
            closing = self.text[self.pos]
            self.pos += 1
            if closing == "}":
                break
        if not any(option.weight > 0 for option in options):
            raise InvalidRequestError(self.field, f"the options of the {{ at character {start + 1}{self.where} all weigh 0")
        return _Variant(tuple(options), low, high, joiner)


def parse(text: str, field_name: str = "prompt", where: str = "") -> tuple[_Node, ...]:
    """A template as text, wildcards and variants; InvalidRequestError on ``field_name`` for a ``{`` never
    closed (``where`` says where the text came from, for a wildcard file's line)."""
    return _Parser(text, field_name, where).parse()


def is_dynamic(text: str) -> bool:
    """Whether ``text`` holds a variant (``{``) or a wildcard (``__name__``) outside a backslash escape.
    A prompt without either takes the engine's ordinary path, untouched."""
    pos = 0
    while pos < len(text):
        char = text[pos]
        if char == "\\":
            pos += 2
            continue
        if char == "{" or (char == "_" and _WILDCARD.match(text, pos)):
            return True
        pos += 1
    return False


def escape(text: str) -> str:
    """Resolved text as a prompt that reads back as itself: braces and ``__name__`` escaped, so ``--from``
    on an image does not resolve its prompt again. The escapes encode exactly as the bare characters
    (the emphasis parser, A1111's too, drops an unknown backslash)."""
    escaped = text.replace("{", "\\{").replace("}", "\\}")
    return _WILDCARD.sub(lambda m: "\\" + m.group(0), escaped)


@dataclass
class Wildcards:
    """The wildcard folder (None: none is set, so a ``__name__`` is an error). Each file is read and its
    lines parsed once per object."""

    folder: Path | None
    _lines: dict[str, tuple[tuple[_Node, ...], ...]] = field(default_factory=dict, repr=False)

    def lines(self, name: str, field_name: str) -> tuple[tuple[_Node, ...], ...]:
        if name not in self._lines:
            self._lines[name] = self._read(name, field_name)
        return self._lines[name]

    def _read(self, name: str, field_name: str) -> tuple[tuple[_Node, ...], ...]:
        if self.folder is None:
            raise InvalidRequestError(field_name, f"__{name}__ is a wildcard, but no wildcard folder is set")
        parts = name.split("/")
        # A server's remote clients write prompts: a wildcard names a file inside the folder, never beside it.
        if any(part in ("", ".", "..") for part in parts):
            raise InvalidRequestError(
                field_name, f"wildcard __{name}__: a name is a path inside {self.folder}, without '.' or '..' parts"
            )
        path = self.folder.joinpath(*parts[:-1], parts[-1] + ".txt")
        if not path.is_file():
            raise InvalidRequestError(
                field_name, f"wildcard __{name}__: no file {'/'.join(parts)}.txt in the wildcard folder {self.folder}"
            )
        try:
            text = path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as err:
            raise InvalidRequestError(field_name, f"wildcard __{name}__: cannot read {path}: {err}") from None
        lines = []
        for number, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if line and not line.startswith("#"):
                lines.append(parse(line, field_name, f" of line {number} of {path}"))
        if not lines:
            raise InvalidRequestError(
                field_name, f"wildcard __{name}__: {path} has no lines (blank lines and # comments do not count)"
            )
        return tuple(lines)


def _descend(name: str, chain: tuple[str, ...], field_name: str) -> tuple[str, ...]:
    chain = (*chain, name)
    if len(chain) > MAX_DEPTH:
        path = " → ".join(f"__{n}__" for n in chain[: MAX_DEPTH + 1])
        raise InvalidRequestError(field_name, f"wildcards nest more than {MAX_DEPTH} deep ({path}); does a file name itself?")
    return chain


# Random mode.


def _pick(rng: Random, weights: Sequence[float]) -> int:
    """An index drawn in proportion to ``weights`` (one ``rng.random()``, so a draw is easy to replay)."""
    target, total = rng.random() * sum(weights), 0.0
    for index, weight in enumerate(weights):
        total += weight
        if target < total:
            return index
    return max(i for i, w in enumerate(weights) if w > 0)  # rounding at the very top


def _random(nodes: Sequence[_Node], rng: Random, wildcards: Wildcards, field_name: str, chain: tuple[str, ...]) -> str:
    out = []
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, _Wildcard):
            lines = wildcards.lines(node.name, field_name)
            line = lines[_pick(rng, [1.0] * len(lines))]
            out.append(_random(line, rng, wildcards, field_name, _descend(node.name, chain, field_name)))
        else:
            options = list(node.options)
            high = len(options) if node.high is None else min(node.high, len(options))
            low = min(node.low, high)
            count = low if low == high else rng.randint(low, high)
            picked = []
            for _ in range(count):
                if not any(option.weight > 0 for option in options):
                    break
                picked.append(options.pop(_pick(rng, [option.weight for option in options])))
            out.append(node.joiner.join(_random(option.nodes, rng, wildcards, field_name, chain) for option in picked))
    return "".join(out)


def resolve(template: str, rng: Random, wildcards: Wildcards | None = None, field_name: str = "prompt") -> str:
    """One text from ``template``, every choice drawn from ``rng``."""
    return _random(parse(template, field_name), rng, wildcards or Wildcards(None), field_name, ())


# Combinatorial mode.


def _each(nodes: Sequence[_Node], wildcards: Wildcards, field_name: str, chain: tuple[str, ...]) -> Iterator[str]:
    """Every text of a sequence, the first node's choice changing slowest (lazily: a limit stops it early)."""
    if not nodes:
        yield ""
        return
    for head in _each_node(nodes[0], wildcards, field_name, chain):
        for rest in _each(nodes[1:], wildcards, field_name, chain):
            yield head + rest


def _each_node(node: _Node, wildcards: Wildcards, field_name: str, chain: tuple[str, ...]) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, _Wildcard):
        inner = _descend(node.name, chain, field_name)
        for line in wildcards.lines(node.name, field_name):
            yield from _each(line, wildcards, field_name, inner)
    else:
        options = [option for option in node.options if option.weight > 0]
        high = len(options) if node.high is None else min(node.high, len(options))
        for count in range(min(node.low, high), high + 1):
            for chosen in combinations(options, count):
                yield from _joined(chosen, node.joiner, wildcards, field_name, chain)


def _joined(
    options: Sequence[_Option], joiner: str, wildcards: Wildcards, field_name: str, chain: tuple[str, ...]
) -> Iterator[str]:
    if not options:
        yield ""
        return
    for head in _each(options[0].nodes, wildcards, field_name, chain):
        for rest in _joined(options[1:], joiner, wildcards, field_name, chain):
            yield head + joiner + rest if len(options) > 1 else head


def all_prompts(template: str, limit: int, wildcards: Wildcards | None = None, field_name: str = "prompt") -> list[str]:
    """Every text ``template`` can make, in order, at most ``limit`` of them (sd-dynamic-prompts'
    combinatorial generation); weights only leave out options that weigh 0."""
    return list(islice(_each(parse(template, field_name), wildcards or Wildcards(None), field_name, ()), limit))


@dataclass
class DynamicPrompts:
    """How the engine resolves templates: the wildcard folder, and random (default) or combinatorial mode.

    Random: image *i*'s texts are drawn from ``random.Random(its seed)``, the prompt's choices first,
    then the negative prompt's. Combinatorial: image *i* gets the *i*-th combination of each template;
    past the last combination they start over (the images still differ by seed).
    """

    wildcard_folder: Path | None = None
    combinatorial: bool = False
    _wildcards: Wildcards | None = field(default=None, repr=False)

    @property
    def wildcards(self) -> Wildcards:
        if self._wildcards is None or self._wildcards.folder != self.wildcard_folder:
            self._wildcards = Wildcards(self.wildcard_folder)
        return self._wildcards

    def image_texts(self, prompt: str, negative: str, seeds: Sequence[int]) -> list[tuple[str, str]]:
        """(prompt, negative prompt) for each image, one per seed; a template without syntax stays as it is."""
        wildcards = self.wildcards
        if self.combinatorial:
            columns = [
                all_prompts(text, len(seeds), wildcards, name) if is_dynamic(text) else [text]
                for text, name in ((prompt, "prompt"), (negative, "negative_prompt"))
            ]
            return [(columns[0][i % len(columns[0])], columns[1][i % len(columns[1])]) for i in range(len(seeds))]
        texts = []
        for seed in seeds:
            rng = Random(seed)
            texts.append(tuple(
                resolve(text, rng, wildcards, name) if is_dynamic(text) else text
                for text, name in ((prompt, "prompt"), (negative, "negative_prompt"))
            ))
        return texts
