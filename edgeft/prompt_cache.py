"""K/V of recent prompts, kept per adapter set, so that a request after a swap does not prefill
its task's fixed prefix (system prompt, template head) again.

A change of the adapter set must clear the context's KV memory: K/V computed under one set are
wrong under another. Before the engine clears it, it saves sequence 0's state (llama.cpp's
`llama_state_seq_get_data`: the cells' K/V and positions) here under the set it was computed with;
a later request under the same set restores the entry that shares the longest prefix with its
prompt and prefills only the rest. Keys name each adapter's file version (path, inode, size,
mtime) and scale, so an entry can only ever be restored under the very weights that wrote it.

Entries are bounded by a budget in MB, least recently used evicted first. An entry replaces the
older ones of its set that it extends (their tokens are a prefix of its own: it serves every
request they served), and a set keeps at most PER_SET entries, its least recently used going
first, so that one task's stream of distinct prompts (a batch saves each answer's prompt, see
continuous.py) cannot push the other sets' prefixes out of the budget.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

AdapterSetKey = tuple  # ((name, file version, scale), ...) sorted by name; () is the bare base

MIN_REUSE = 4       # a restore that saves fewer prompt tokens than this is not worth its copy
PER_SET = 8         # entries one adapter set may hold (its recent distinct prompts)


@dataclass
class _Entry:
    key: AdapterSetKey
    tokens: tuple[int, ...]
    state: bytearray


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    saves: int = 0
    evictions: int = 0
    reused_tokens: int = 0


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class PromptCache:
    """Saved sequence states keyed by adapter set, within `budget_mb` (0 turns the cache off)."""

    def __init__(self, budget_mb: float = 32.0):
        if not budget_mb >= 0:
            raise ValueError("the prompt cache budget must be 0 MB or more")
        self.budget_bytes = int(budget_mb * 1e6)
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # least recently used first
        self._next = 0
        self._bytes = 0   # kept as a sum so report() never iterates while a worker thread edits
        self.stats = CacheStats()

    @property
    def enabled(self) -> bool:
        return self.budget_bytes > 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, key: AdapterSetKey, tokens: Sequence[int], state: bytearray) -> bool:
        """Keep `state` (the K/V of exactly `tokens`) for `key`; False when it cannot fit."""
        if not self.enabled or len(state) > self.budget_bytes or len(tokens) < MIN_REUSE:
            return False
        tokens = tuple(tokens)
        for i, e in list(self._entries.items()):
            if e.key == key and tokens[:len(e.tokens)] == e.tokens:
                self._bytes -= len(self._entries.pop(i).state)
        own = [i for i, e in self._entries.items() if e.key == key]
        for i in own[:max(0, len(own) - PER_SET + 1)]:
            self._bytes -= len(self._entries.pop(i).state)
            self.stats.evictions += 1
        while self._entries and self._bytes + len(state) > self.budget_bytes:
            self._bytes -= len(self._entries.popitem(last=False)[1].state)
            self.stats.evictions += 1
        self._entries[self._next] = _Entry(key, tokens, state)
        self._bytes += len(state)
        self._next += 1
        self.stats.saves += 1
        return True

    def longest(self, key: AdapterSetKey, tokens: Sequence[int], usable: int) -> int:
        """How many of `tokens` (at most `usable`) this set's best entry would restore; a look
        that changes nothing (no statistics, no recency), for planning."""
        return max((min(common_prefix(e.tokens, tokens), usable) for e in self._entries.values() if e.key == key),
                   default=0)

    def best(self, key: AdapterSetKey, tokens: Sequence[int], usable: int,
             at_least: int = MIN_REUSE) -> tuple[bytearray, tuple[int, ...], int] | None:
        """(state, its tokens, tokens to keep) of this set's entry sharing the longest prefix
        with `tokens`, at most `usable` of them kept; None (a miss) when none keeps `at_least`."""
        found, keep = None, 0
        for i, e in self._entries.items():
            if e.key != key:
                continue
            n = min(common_prefix(e.tokens, tokens), usable)
            if n > keep:
                found, keep = i, n
        if found is None or keep < max(at_least, MIN_REUSE):
            self.stats.misses += 1
            return None
        self._entries.move_to_end(found)
        self.stats.hits += 1
        self.stats.reused_tokens += keep
        e = self._entries[found]
        return e.state, e.tokens, keep

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0

    def report(self) -> dict:
        """What /stats, /health, doctor and the bench show."""
        s = self.stats
        return {"enabled": self.enabled, "budget_mb": round(self.budget_bytes / 1e6, 3),
                "entries": len(self._entries), "mb": round(self.nbytes / 1e6, 3),
                "hits": s.hits, "misses": s.misses, "saves": s.saves, "evictions": s.evictions,
                "reused_tokens": s.reused_tokens}
