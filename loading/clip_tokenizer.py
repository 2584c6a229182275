"""CLIP's tokenizer: OpenAI's byte-level BPE, id for id.

Machinery a learner may skip, as OpenAI's own package keeps it apart (``simple_tokenizer.py``): text in, the token
ids the text tower reads out. ``clip_model`` exposes ``tokenize``. The vocabulary,
``bpe_simple_vocab_16e6.txt.gz``, ships beside this file (``clip_weights.vocab_path``).
"""

from __future__ import annotations

import gzip
import html
import os
import re
from functools import lru_cache

import ftfy
import regex
import torch

from loading.clip_weights import vocab_path


@lru_cache
def _bytes_to_unicode() -> dict[int, str]:
    """Each byte as a printable character: printable Latin-1 maps to itself, the rest above 255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def _clean(text: str) -> str:
    """ftfy fixes, HTML entities unescaped (twice, as OpenAI does), whitespace collapsed, lower case."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip().lower()


class Tokenizer:
    """Byte-level BPE over a 49,152-entry vocabulary, giving OpenAI's ids exactly."""

    SPECIALS = ("<|startoftext|>", "<|endoftext|>")
    PATTERN = regex.compile(
        r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
        regex.IGNORECASE,
    )

    def __init__(self, vocab_path: str | os.PathLike):
        with gzip.open(vocab_path, "rt", encoding="utf-8") as file:
            merges = [tuple(line.split()) for line in file.read().split("\n")[1 : 49152 - 256 - 2 + 1]]
        self.byte_encoder = _bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        symbols = list(self.byte_encoder.values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + list(self.SPECIALS)
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.decoder = dict(enumerate(vocab))
        self.merge_ranks = {merge: rank for rank, merge in enumerate(merges)}
        self.sot_token, self.eot_token = (self.encoder[s] for s in self.SPECIALS)
        self._cache = {s: s for s in self.SPECIALS}

    def _bpe(self, word: str) -> str:
        """Merge the symbols of one pre-token, lowest-ranked pair first; space-separated result."""
        if word in self._cache:
            return self._cache[word]
        symbols = [*word[:-1], word[-1] + "</w>"]
        while len(symbols) > 1:
            pairs = set(zip(symbols, symbols[1:]))
            best = min(pairs, key=lambda pair: self.merge_ranks.get(pair, float("inf")))
            if best not in self.merge_ranks:
                break
            merged, i = [], 0
            while i < len(symbols):
                if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        self._cache[word] = " ".join(symbols)
        return self._cache[word]

    def encode(self, text: str) -> list[int]:
        ids = []
        for piece in self.PATTERN.findall(_clean(text)):
            piece = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[token] for token in self._bpe(piece).split(" "))
        return ids

    def decode(self, ids: list[int]) -> str:
        text = "".join(self.decoder[i] for i in ids)
        return bytearray(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace").replace("</w>", " ")


@lru_cache
def _tokenizer(download_root: str | None) -> Tokenizer:
    return Tokenizer(vocab_path(download_root))


def tokenize(
    texts: str | list[str], context_length: int = 77, truncate: bool = False, download_root: str | None = None
) -> torch.Tensor:
    """``[len(texts), context_length]`` int64: ``<sot> ids <eot>`` then zeros, as ``clip.tokenize``.

    A text too long for ``context_length`` raises ``ValueError`` unless ``truncate``, which keeps the
    first ``context_length`` ids and ends them with ``<eot>``.
    """
    tokenizer = _tokenizer(download_root)
    texts = [texts] if isinstance(texts, str) else texts
    result = torch.zeros(len(texts), context_length, dtype=torch.long)
    for row, text in enumerate(texts):
        ids = [tokenizer.sot_token, *tokenizer.encode(text), tokenizer.eot_token]
        if len(ids) > context_length:
            if not truncate:
                raise ValueError(f"{text!r} is {len(ids)} tokens, longer than the context length {context_length}")
            ids = [*ids[: context_length - 1], tokenizer.eot_token]
        result[row, : len(ids)] = torch.tensor(ids)
    return result
