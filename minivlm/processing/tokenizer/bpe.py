"""The BPE model of the tokenizers library, step for step: the exact reference for every BPE vocabulary.

A pre-tokenized word becomes one symbol per character (a character missing from the vocab is
spelled as its `<0xNN>` byte pieces under byte fallback, becomes the unknown token, or is dropped
when there is neither), and then the adjacent pair that comes first in the merge list is merged,
the leftmost among equals, until no listed pair is left. With `ignore_merges` a word that is a
token is that token. This mirrors tokenizers' `BPE::merge_word` and `Word::merge_all`
(tokenizers/src/models/bpe/{model,word}.rs), quirks included: byte pieces written while an
unknown run is pending go in front of it.

Pure Python, so each word's ids are cached; `bytelevel.py` hands most words to tiktoken where
it provably gives the same ids.
"""

from __future__ import annotations

import heapq

from .base import TokenizerError

CACHE_SIZE = 65536  # words; the cache is emptied when full (a long text of new words keeps its speed)


class BPE:
    def __init__(
        self,
        vocab: dict[str, int],
        merges: list[tuple[str, str]],
        *,
        ignore_merges: bool = False,
        byte_fallback: bool = False,
        unk_token: str | None = None,
        fuse_unk: bool = False,
        source: str = "tokenizer.json",
    ):
        self.vocab = vocab
        self.ignore_merges = ignore_merges
        self.byte_fallback = byte_fallback
        self.fuse_unk = fuse_unk
        self.unk_id = vocab.get(unk_token) if unk_token is not None else None
        if unk_token is not None and self.unk_id is None:
            raise TokenizerError(f"{source}: the unknown token {unk_token!r} is not in the vocab")
        # (left id, right id) -> (rank, merged id); a pair listed twice keeps its last rank, as in tokenizers.
        self.merges: dict[tuple[int, int], tuple[int, int]] = {}
        for rank, (a, b) in enumerate(merges):
            ids = vocab.get(a), vocab.get(b), vocab.get(a + b)
            if None in ids:
                missing = [t for t, i in zip((a, b, a + b), ids) if i is None][0]
                raise TokenizerError(f"{source}: merge {a!r} + {b!r} needs {missing!r}, which is not in the vocab")
            self.merges[ids[0], ids[1]] = (rank, ids[2])
        self.byte_ids = [vocab.get(f"<0x{b:02X}>") for b in range(256)]
        self._cache: dict[str, list[int]] = {}
        # A faster function that gives the same ids for the words it accepts (None for the rest).
        self.shortcut = None

    def encode_word(self, word: str) -> list[int]:
        """One pre-tokenized word -> ids."""
        if self.ignore_merges and (i := self.vocab.get(word)) is not None:
            return [i]
        ids = self._cache.get(word)
        if ids is None:
            ids = self.shortcut(word) if self.shortcut is not None else None
            if ids is None:
                ids = self.merge(self.symbols(word))
            if len(self._cache) >= CACHE_SIZE:
                self._cache.clear()
            self._cache[word] = ids
        return ids

    def symbols(self, word: str) -> list[int]:
        """One id per character, before any merge (tokenizers' `merge_word` up to `merge_all`)."""
        out: list[int] = []
        unk = False  # an unknown run is pending (written once the run ends)
        for ch in word:
            i = self.vocab.get(ch)
            if i is not None:
                if unk:
                    out.append(self.unk_id)
                    unk = False
                out.append(i)
                continue
            if self.byte_fallback:
                pieces = [self.byte_ids[b] for b in ch.encode()]
                if None not in pieces:
                    out.extend(pieces)  # the pending unknown stays pending, behind these
                    continue
            if self.unk_id is not None:
                if unk and not self.fuse_unk:
                    out.append(self.unk_id)
                unk = True
            # else: no token and no unknown token: the character is dropped
        if unk:
            out.append(self.unk_id)
        return out

    def merge(self, symbols: list[int]) -> list[int]:
        """Merge the listed pair of lowest rank, the leftmost among equals, until none is left: a
        heap over a linked list, so a long word costs n log n and not n^2."""
        merges = self.merges
        n = len(symbols)
        if n < 2:
            return symbols
        nxt = [*range(1, n), -1]
        prev = [*range(-1, n - 1)]
        heap = []
        for i in range(n - 1):
            m = merges.get((symbols[i], symbols[i + 1]))
            if m is not None:
                heap.append((m[0], i, m[1]))
        heapq.heapify(heap)
        while heap:
            _, i, new = heapq.heappop(heap)
            j = nxt[i]
            if symbols[i] is None or j == -1:
                continue
            m = merges.get((symbols[i], symbols[j]))
            if m is None or m[1] != new:
                continue  # stale: a neighbour has merged since this pair was queued
            symbols[i], symbols[j] = new, None
            nxt[i] = nxt[j]
            if nxt[i] != -1:
                prev[nxt[i]] = i
            for left, right in ((prev[i], i), (i, nxt[i])):
                if left != -1 and right != -1 and (m := merges.get((symbols[left], symbols[right]))) is not None:
                    heapq.heappush(heap, (m[0], left, m[1]))
        return [s for s in symbols if s is not None]
