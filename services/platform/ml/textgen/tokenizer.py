"""Tokenizers as data: a byte-level base and a small byte-pair encoding trained on a corpus.

A tokenizer is a JSON document (`cairn.bpe.v1`), so it is content-addressable like every
other artifact:

    {"format": "cairn.bpe.v1", "vocab_size": 256 + len(merges), "pattern": <pre-split regex>,
     "merges": [[a, b], ...]}

Ids 0..255 are the raw bytes; merge i creates id 256 + i from the pair (a, b). Any byte
sequence encodes (no unknown tokens), and decoding is the concatenation of bytes.

Training (`train_bpe`) is deterministic: text is pre-split by a fixed regex into chunks
(merges never cross a chunk boundary), pair counts are weighted by chunk frequency, and the
most frequent pair wins, ties broken by the smallest (a, b) ids. Same text and vocab size,
same JSON bytes, in any process.
"""

from __future__ import annotations

import heapq
import json
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

FORMAT = "cairn.bpe.v1"
N_BYTES = 256
#: GPT-2-style pre-split with the stdlib `re` module: letters/underscore runs, digit runs and
#: punctuation runs, each with an optional leading space, then whitespace.
PATTERN = r" ?[^\W\d]+| ?\d+| ?[^\s\w]+|\s+(?!\S)|\s+"
#: Default corpus size limit for `validate_corpus` (bytes).
MAX_CORPUS_BYTES = 256 * 1024 * 1024


class CorpusError(ValueError):
    """A corpus that cannot be used: not UTF-8, empty, or over the size limit."""


def validate_corpus(data: bytes, max_bytes: int = MAX_CORPUS_BYTES, name: str = "corpus") -> str:
    """Check a corpus and return it decoded. Raises `CorpusError` with a precise reason.

    - empty: "corpus is empty"
    - too large: "corpus is N bytes, over the limit of M bytes"
    - not UTF-8: the byte offset, line number and offending bytes of the first bad sequence.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise CorpusError(f"{name}: expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) == 0:
        raise CorpusError(f"{name} is empty")
    if len(data) > max_bytes:
        raise CorpusError(f"{name} is {len(data)} bytes, over the limit of {max_bytes} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        bad = data[e.start : min(e.end, e.start + 4)].hex(" ")
        raise CorpusError(
            f"{name} is not valid UTF-8: {e.reason} at byte offset {e.start} (line {line}), bytes {bad}"
        ) from None


def _dump(merges: Sequence[tuple[int, int]]) -> str:
    doc = {
        "format": FORMAT,
        "vocab_size": N_BYTES + len(merges),
        "pattern": PATTERN,
        "merges": [[int(a), int(b)] for a, b in merges],
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))


def _chunks(text: str, pattern: str = PATTERN) -> list[str]:
    return re.findall(pattern, text)


def train_bpe(text: str, vocab_size: int) -> str:
    """Train a byte-level BPE with `vocab_size - 256` merges on `text`; returns tokenizer JSON.

    Stops early (smaller vocabulary) when no pair occurs twice. Deterministic: ties between
    equally frequent pairs go to the smallest (a, b).
    """
    if vocab_size < N_BYTES:
        raise ValueError(f"vocab_size must be at least {N_BYTES}, got {vocab_size}")
    counts = Counter(_chunks(text))
    # unique chunks in a fixed order (sorted), each a mutable list of ids with a weight
    words: list[list[int]] = []
    weights: list[int] = []
    for chunk in sorted(counts):
        words.append(list(chunk.encode("utf-8")))
        weights.append(counts[chunk])
    pair_counts: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)
    for wi, w in enumerate(words):
        for pair in zip(w, w[1:], strict=False):
            pair_counts[pair] += weights[wi]
            where[pair].add(wi)
    heap = [(-c, a, b) for (a, b), c in pair_counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[int, int]] = []
    while len(merges) < vocab_size - N_BYTES and heap:
        neg, a, b = heapq.heappop(heap)
        current = pair_counts.get((a, b), 0)
        if current != -neg:  # stale heap entry: push the current count back if any
            if current > 0:
                heapq.heappush(heap, (-current, a, b))
            continue
        if current < 2:
            break
        new_id = N_BYTES + len(merges)
        merges.append((a, b))
        touched: set[tuple[int, int]] = set()
        for wi in sorted(where.pop((a, b), ())):
            w, weight = words[wi], weights[wi]
            for pair in zip(w, w[1:], strict=False):
                pair_counts[pair] -= weight
                touched.add(pair)
            merged: list[int] = []
            i = 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                    merged.append(new_id)
                    i += 2
                else:
                    merged.append(w[i])
                    i += 1
            words[wi] = merged
            for pair in zip(merged, merged[1:], strict=False):
                pair_counts[pair] += weight
                where[pair].add(wi)
                touched.add(pair)
        pair_counts.pop((a, b), None)
        for pair in touched:
            c = pair_counts.get(pair, 0)
            if c > 0:
                heapq.heappush(heap, (-c, pair[0], pair[1]))
            else:
                pair_counts.pop(pair, None)
    return _dump(merges)


@dataclass
class Tokenizer:
    """A loaded tokenizer: `encode(text) -> list[int]`, `decode(ids) -> str`."""

    merges: list[tuple[int, int]]
    pattern: str = PATTERN
    _ranks: dict[tuple[int, int], int] = field(default_factory=dict, repr=False)
    _vocab: list[bytes] = field(default_factory=list, repr=False)
    _cache: dict[str, tuple[int, ...]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._ranks = {pair: i for i, pair in enumerate(self.merges)}
        self._vocab = [bytes([i]) for i in range(N_BYTES)]
        for i, (a, b) in enumerate(self.merges):
            if not (0 <= a < N_BYTES + i and 0 <= b < N_BYTES + i):
                raise ValueError(f"merge {i} refers to an id not yet defined: {(a, b)}")
            self._vocab.append(self._vocab[a] + self._vocab[b])
        self._regex = re.compile(self.pattern)

    @property
    def vocab_size(self) -> int:
        return N_BYTES + len(self.merges)

    def _encode_chunk(self, chunk: str) -> tuple[int, ...]:
        cached = self._cache.get(chunk)
        if cached is not None:
            return cached
        ids = list(chunk.encode("utf-8"))
        ranks = self._ranks
        while len(ids) > 1:
            best = min(((ranks.get(p, 1 << 30), i) for i, p in enumerate(zip(ids, ids[1:], strict=False))))
            rank, _ = best
            if rank == 1 << 30:
                break
            a, b = self.merges[rank]
            merged: list[int] = []
            i = 0
            while i < len(ids):
                if i + 1 < len(ids) and ids[i] == a and ids[i + 1] == b:
                    merged.append(N_BYTES + rank)
                    i += 2
                else:
                    merged.append(ids[i])
                    i += 1
            ids = merged
        out = tuple(ids)
        if len(self._cache) < 1 << 18:
            self._cache[chunk] = out
        return out

    def encode(self, text: str) -> list[int]:
        out: list[int] = []
        if not self.merges:
            return list(text.encode("utf-8"))
        for chunk in self._regex.findall(text):
            out.extend(self._encode_chunk(chunk))
        return out

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        vocab = self._vocab
        return b"".join(vocab[int(i)] for i in ids)

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text. Invalid UTF-8 (a generation cut mid-character) becomes U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, i: int) -> bytes:
        return self._vocab[i]


def load_tokenizer(tokenizer: str | bytes | dict | Tokenizer) -> Tokenizer:
    """Tokenizer JSON (str, bytes or parsed dict) -> `Tokenizer`; a `Tokenizer` passes through."""
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    doc = json.loads(tokenizer) if isinstance(tokenizer, str | bytes | bytearray) else tokenizer
    if doc.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} tokenizer: format {doc.get('format')!r}")
    merges = [(int(a), int(b)) for a, b in doc["merges"]]
    if doc.get("vocab_size") != N_BYTES + len(merges):
        raise ValueError("tokenizer vocab_size does not match its merges")
    return Tokenizer(merges, doc.get("pattern", PATTERN))


def encode(tokenizer: str | bytes | dict | Tokenizer, text: str) -> np.ndarray:
    """Text -> token ids as a numpy array (uint16 when the vocabulary fits, else uint32)."""
    tok = load_tokenizer(tokenizer)
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    return np.asarray(tok.encode(text), dtype=dtype)


def decode(tokenizer: str | bytes | dict | Tokenizer, ids: Iterable[int]) -> str:
    return load_tokenizer(tokenizer).decode(ids)
