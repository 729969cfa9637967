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
from typing import Iterable, NamedTuple, Optional

from transformers import PreTrainedTokenizerBase

Encoded = tuple[list[int], list[tuple[int, int]]]  # ids, and each id's (start, end) characters in the text


def cuts_exactly(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether cutting a text at the literal text of every added token is where the tokenizer cuts it."""
    has_normalizer = tokenizer.backend_tokenizer.normalizer is not None
    return all(
        not (token.lstrip or token.rstrip or token.single_word or (token.normalized and has_normalizer))
        for token in tokenizer.added_tokens_decoder.values()
    )


class Pieces:
    """Each distinct piece of text between added tokens encoded once (see the module's docstring); ``encode`` gives
    a text's ids and offsets. Kept for a batch of conversations: their pieces are encoded together by ``prefetch``."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        self.added = {token.content: index for index, token in tokenizer.added_tokens_decoder.items()}
        exact = bool(self.added) and cuts_exactly(tokenizer)
        # Longest first: at each position the longest added token wins, as in the tokenizer's own matcher.
        self.cut = re.compile("|".join(map(re.escape, sorted(self.added, key=len, reverse=True)))) if exact else None
        self.anchor = next(iter(self.added), "")
        self.done: dict[tuple[str, bool], Encoded] = {}

    def prefetch(self, texts: Iterable[str]) -> None:
        """Encode, in one call, every piece of ``texts`` not encoded yet."""
        if self.cut is None:
            return
        wanted = {key for text in texts for key in self._pieces(text) if key not in self.done}
        self._encode_pieces(sorted(wanted))

    def encode(self, text: str, start: int = 0) -> tuple[list[int], list[tuple[int, int]], list[tuple[int, int]]]:
        """(ids, offsets, cuts) of ``text[start:]`` read in place (``start`` must be 0 or just after an added token);
        ``cuts``: (character, token count) after each added token, where a prefix of the text may be taken over."""
        if self.cut is None:
            return (*_encode_whole(self.tokenizer, text), [])
        self._encode_pieces([key for key in self._pieces(text, start) if key not in self.done])
        ids, offsets, cuts, position = [], [], [], start
        for match in [*self.cut.finditer(text, start), None]:
            end = len(text) if match is None else match.start()
            if end > position:
                piece_ids, piece_offsets = self.done[(text[position:end], position == 0)]
                ids += piece_ids
                offsets += [(a + position, b + position) for a, b in piece_offsets] if position else piece_offsets
            if match is not None:
                ids.append(self.added[match.group()])
                offsets.append(match.span())
                position = match.end()
                cuts.append((position, len(ids)))
        return ids, offsets, cuts

    def _pieces(self, text: str, start: int = 0) -> list[tuple[str, bool]]:
        """(piece, whether it starts the text) for each stretch of ``text[start:]`` between added tokens."""
        keys, position = [], start
        for match in [*self.cut.finditer(text, start), None]:
            end = len(text) if match is None else match.start()
            if end > position:
                keys.append((text[position:end], position == 0))
            position = end if match is None else match.end()
        return keys

    def _encode_pieces(self, keys: list[tuple[str, bool]]) -> None:
        if not keys:
            return
        # A piece inside a text is read after an added token: encoded after the anchor, which is then dropped.
        texts = [piece if first else self.anchor + piece for piece, first in keys]
        backend = self.tokenizer.backend_tokenizer
        if backend.truncation is None and backend.padding is None and not backend.encode_special_tokens:
            # What tokenizer(texts, add_special_tokens=False) calls, without building its dictionaries.
            encoded = [(e.ids, e.offsets) for e in backend.encode_batch(texts, add_special_tokens=False)]
        else:
            encoding = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
            encoded = zip(encoding["input_ids"], encoding["offset_mapping"])
        for (piece, first), (ids, offsets) in zip(keys, encoded):
            skip, shift = (0, 0) if first else (1, len(self.anchor))
            self.done[(piece, first)] = ids[skip:], [(a - shift, b - shift) for a, b in offsets[skip:]]


def _encode_whole(tokenizer: PreTrainedTokenizerBase, text: str, split_special_tokens: bool = False) -> Encoded:
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

    def _assemble(self, text: str) -> Encoded:
        """From the pieces; a prefix of the longest text assembled so far (a turn's prompt, of the conversation)
        takes that text's ids up to its last added token inside the prefix, and only the rest is assembled."""
        base = self.done.get(None)
        if base is not None and base[0].startswith(text):
            position, count = max(((p, n) for p, n in base[3] if p <= len(text)), default=(0, 0))
            ids, offsets, _ = self.pieces.encode(text, position)
            return base[1][:count] + ids, base[2][:count] + offsets
        ids, offsets, cuts = self.pieces.encode(text)
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
        return ids, offsets


def _occurrences(text: str, literal: str) -> list[int]:
    found, start = [], text.find(literal)
    while start >= 0:
        found.append(start)
        start = text.find(literal, start + len(literal))
    return found
