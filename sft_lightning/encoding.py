"""Text to token ids and character offsets exactly as the tokenizer reads the whole text, computed piece by piece.

A fast tokenizer first cuts its input at its added tokens (``<|im_start|>``, ``<|eot_id|>``, ``<think>``) and
encodes each piece between them on its own. The texts rendering asks for (a conversation, each turn's prompt, the
conversation up to each turn) are made of the same pieces again and again, so :class:`Pieces` encodes each
distinct piece once, many in one batched call, and assembles a text's ids from them: the same ids and offsets as
encoding the text whole, at about one pass over the conversation's tokens instead of three.

That equality rests on the cut being the tokenizer's own, decided once per tokenizer (:func:`cuts_exactly`): no added
token strips the whitespace beside it or matches only whole words, and none is matched after normalisation while a
normaliser may change the text around it. Otherwise every text is encoded whole, as before. A piece that does not
start the text is encoded after an added token (then dropped), as it is read in place: a SentencePiece tokenizer
(Metaspace, ``prepend_scheme="first"``) gives only the text's very first piece its leading "▁".
"""

from __future__ import annotations

import re
from bisect import bisect_right
from typing import Iterable, Iterator, NamedTuple, Optional, Sequence

from transformers import PreTrainedTokenizerBase

Span = tuple[int, int]  # an id's (start, end) characters in the text


def cuts_exactly(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether cutting a text at the literal text of every added token is where the tokenizer cuts it."""
    has_normalizer = tokenizer.backend_tokenizer.normalizer is not None
    return all(
        not (token.lstrip or token.rstrip or token.single_word or (token.normalized and has_normalizer))
        for token in tokenizer.added_tokens_decoder.values()
    )


def any_of(texts: Iterable[str]) -> re.Pattern:
    """A pattern that finds any of ``texts``, in one scan: at a position, the first listed among those that start
    there; it never matches for no texts."""
    return re.compile("|".join(map(re.escape, texts)) or "(?!)")


class _Piece:
    """An encoded piece: its ids, and its spans, made from its encoding's (a tokenizers ``Encoding`` or a list) only
    when asked for, without the anchor's ``skip`` ids and ``shift`` characters."""

    __slots__ = ("ids", "_source", "_skip", "_shift", "_spans")

    def __init__(self, ids: list[int], source, skip: int, shift: int):
        self.ids, self._source, self._skip, self._shift, self._spans = ids, source, skip, shift, None

    def spans(self) -> list[Span]:
        if self._spans is None:
            source = self._source if isinstance(self._source, list) else self._source.offsets
            self._spans = [(a - self._shift, b - self._shift) for a, b in source[self._skip :]]
            self._source = None
        return self._spans


class Offsets(Sequence):
    """The spans of a text's ids, kept as the spans of its parts (pieces, added tokens) and computed where read:
    rendering reads a few per turn (its special tokens), so most are never built. ``skip``/``shift``: a view of the
    ids from ``skip`` on, in characters from ``shift`` on."""

    __slots__ = ("parts", "starts", "length", "skip", "shift")

    def __init__(self, parts: list[tuple[int, int, object]], length: int, skip: int = 0, shift: int = 0):
        self.parts, self.length, self.skip, self.shift = parts, length, skip, shift  # (first id, character, spans)
        self.starts = [part[0] for part in parts]

    @classmethod
    def of(cls, spans: list[Span]) -> "Offsets":
        return cls([(0, 0, spans)], len(spans))

    def __len__(self) -> int:
        return self.length - self.skip

    def __getitem__(self, index: int) -> Span:
        if not 0 <= index < len(self):
            raise IndexError(index)
        index += self.skip
        first, position, spans = self.parts[bisect_right(self.starts, index) - 1]
        start, end = (spans.spans() if isinstance(spans, _Piece) else spans)[index - first]
        return start + position - self.shift, end + position - self.shift

    def __iter__(self) -> Iterator[Span]:
        return (self[index] for index in range(len(self)))

    def after(self, skip: int, shift: int) -> "Offsets":
        """The spans of the ids from ``skip`` on, counted from character ``shift``."""
        return Offsets(self.parts, self.length, self.skip + skip, self.shift + shift)

    def joined(self, count: int, tail: "Offsets") -> "Offsets":
        """The first ``count`` spans (``count`` at a part's boundary), then ``tail``'s."""
        head = [part for part in self.parts if part[0] < count]
        return Offsets(head + [(first + count, position, spans) for first, position, spans in tail.parts],
                       count + tail.length)


Encoded = tuple[list[int], Offsets]


class Pieces:
    """Each distinct piece of text between added tokens encoded once (see the module's docstring); ``encode`` gives
    a text's ids and offsets. Kept for a batch of conversations: their pieces are encoded together by ``prefetch``."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        self.added = {token.content: index for index, token in tokenizer.added_tokens_decoder.items()}
        exact = bool(self.added) and cuts_exactly(tokenizer)
        # Longest first: at each position the longest added token wins, as in the tokenizer's own matcher.
        self.cut = any_of(sorted(self.added, key=len, reverse=True)) if exact else None
        self.anchor = next(iter(self.added), "")
        self.done: dict[tuple[str, bool], _Piece] = {}
        self.splits: dict[str, list] = {}  # the prefetched texts' parts
        self.tails: dict[str, list[int]] = {}  # the ids of texts read after an added token (turns' prompts end so)

    def prefetch(self, texts: Iterable[str]) -> None:
        """Encode, in one call, every piece of ``texts`` not encoded yet."""
        if self.cut is None:
            return
        wanted = set()
        for text in texts:
            if text not in self.splits:
                self.splits[text] = self._parts(text)
                wanted.update(key for _, key in self.splits[text] if isinstance(key, tuple) and key not in self.done)
        self._encode_pieces(sorted(wanted))

    def encode(self, text: str, start: int = 0) -> tuple[list[int], Offsets, list[tuple[int, int]]]:
        """(ids, offsets, cuts) of ``text[start:]`` read in place (``start`` must be 0 or just after an added token);
        ``cuts``: (character, id count) after each added token, where a prefix of the text may be taken over."""
        if self.cut is None:
            ids, spans = _encode_whole(self.tokenizer, text)
            return ids, Offsets.of(spans), []
        parts = self.splits.get(text) if start == 0 else None
        parts = self._parts(text, start) if parts is None else parts
        self._encode_pieces(list({key for _, key in parts if isinstance(key, tuple) and key not in self.done}))
        ids, spans, cuts = [], [], []
        for position, key in parts:
            spans.append((len(ids), position, self.done[key] if isinstance(key, tuple) else [(0, len(key))]))
            if isinstance(key, tuple):
                ids += self.done[key].ids
            else:
                ids.append(self.added[key])
                cuts.append((position + len(key), len(ids)))
        return ids, Offsets(spans, len(ids)), cuts

    def tail_ids(self, tail: str) -> list[int]:
        """The ids of ``tail`` read after an added token (as :meth:`encode` of a text from just after one): a turn's
        prompt ends in the same few such tails, so they are kept."""
        if tail not in self.tails:
            self.tails[tail] = self.encode(self.anchor + tail, len(self.anchor))[0]
        return self.tails[tail]

    def _parts(self, text: str, start: int = 0) -> list[tuple[int, object]]:
        """(character, part) for each part of ``text[start:]``: an added token's text, or for a stretch between
        added tokens its key (piece, whether it starts the text)."""
        parts, position = [], start
        for match in [*self.cut.finditer(text, start), None]:
            end = len(text) if match is None else match.start()
            if end > position:
                parts.append((position, (text[position:end], position == 0)))
            if match is not None:
                parts.append((end, match.group()))
                position = match.end()
        return parts

    def _encode_pieces(self, keys: list[tuple[str, bool]]) -> None:
        if not keys:
            return
        # A piece inside a text is read after an added token: encoded after the anchor, which is then dropped.
        texts = [piece if first else self.anchor + piece for piece, first in keys]
        backend = self.tokenizer.backend_tokenizer
        if backend.truncation is None and backend.padding is None and not backend.encode_special_tokens:
            # What tokenizer(texts, add_special_tokens=False) calls, without building its dictionaries; the spans
            # are read from each encoding only where asked for.
            encoded = [(encoding.ids, encoding) for encoding in backend.encode_batch(texts, add_special_tokens=False)]
        else:
            encoding = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
            encoded = list(zip(encoding["input_ids"], encoding["offset_mapping"]))
        for (piece, first), (ids, spans) in zip(keys, encoded):
            skip, shift = (0, 0) if first else (1, len(self.anchor))
            self.done[(piece, first)] = _Piece(ids[skip:], spans, skip, shift)


def _encode_whole(tokenizer: PreTrainedTokenizerBase, text: str, split_special_tokens: bool = False) -> tuple[list[int], list[Span]]:
    encoding = tokenizer(text, add_special_tokens=False, split_special_tokens=split_special_tokens,
                         return_offsets_mapping=True)
    return encoding["input_ids"], encoding["offset_mapping"]


class Encoder(NamedTuple):
    """Text to (ids, character offsets) for one conversation. Special-token text inside ``literals`` (message
    contents, under ``split_special_tokens``) is tokenised as plain text; the template's own special tokens stay
    special. Without literals, texts are assembled from ``pieces``, shared by a batch of conversations."""

    tokenizer: PreTrainedTokenizerBase
    pieces: Pieces
    literals: tuple[str, ...] = ()
    # Each text assembled once per conversation: a turn's prompt and the whole conversation come back several times.
    done: Optional[dict] = None

    @classmethod
    def of(cls, messages: list[dict], pieces: Pieces, specials: Iterable[str], split_special_tokens: bool) -> "Encoder":
        literals = ()
        if split_special_tokens:
            contents = {m["content"] for m in messages if any(token in m["content"] for token in specials)}
            literals = tuple(sorted(contents, key=len, reverse=True))
        return cls(pieces.tokenizer, pieces, literals, {})

    def __call__(self, text: str) -> Encoded:
        """(ids, offsets) of ``text``: the same lists for the same text (callers never change them in place)."""
        if text not in self.done:
            self.done[text] = self._encode_literals(text) if self.literals else self._assemble(text)
        return self.done[text]

    def prefix_ids(self, text: str) -> list[int]:
        """The ids of ``text`` (as ``self(text)[0]``), without its offsets: for a prefix of the longest text assembled
        so far, that text's ids up to its last added token inside the prefix, and the kept ids of the rest."""
        taken = None if self.literals else self._taken_over(text)
        if taken is None or not taken[2]:  # no added token inside: the whole text is read from its start
            return self(text)[0]
        base, position, count = taken
        return base[1][:count] + self.pieces.tail_ids(text[position:])

    def _taken_over(self, text: str) -> Optional[tuple[tuple, int, int]]:
        """Where ``text`` is a prefix of the longest text assembled so far: that text's (text, ids, offsets, cuts),
        and the (character, id count) just after its last added token inside ``text`` ((0, 0) for none)."""
        base = self.done.get(None)
        if base is None or not base[0].startswith(text):
            return None
        cut = bisect_right(base[3], len(text), key=lambda cut: cut[0])
        return (base, *base[3][cut - 1]) if cut else (base, 0, 0)

    def _assemble(self, text: str) -> Encoded:
        """From the pieces; a prefix of the longest text assembled so far (a turn's prompt, of the conversation)
        takes that text's ids up to its last added token inside the prefix, and only the rest is assembled."""
        taken = self._taken_over(text)
        if taken is not None:
            base, position, count = taken
            ids, offsets, _ = self.pieces.encode(text, position)
            return base[1][:count] + ids, base[2].joined(count, offsets)
        ids, offsets, cuts = self.pieces.encode(text)
        base = self.done.get(None)
        if base is None or len(text) > len(base[0]):
            self.done[None] = (text, ids, offsets, cuts)
        return ids, offsets

    def _encode_literals(self, text: str) -> Encoded:
        spans = sorted({(found, found + len(literal)) for literal in self.literals for found in _occurrences(text, literal)})
        ids, offsets, position = [], [], 0
        for start, end in [*spans, (len(text), len(text))]:
            if start < position:  # inside a longer literal already taken
                continue
            for piece, split in ((text[position:start], False), (text[start:end], True)):
                if piece:
                    piece_ids, piece_offsets = _encode_whole(self.tokenizer, piece, split)
                    ids += piece_ids
                    offsets += [(a + position, b + position) for a, b in piece_offsets]
                position += len(piece)
        return ids, Offsets.of(offsets)


def _occurrences(text: str, literal: str) -> list[int]:
    found, start = [], text.find(literal)
    while start >= 0:
        found.append(start)
        start = text.find(literal, start + len(literal))
    return found
