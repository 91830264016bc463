"""A fixed budget of key/value slots while decoding (the artifact's `preprocess.kv_policy`, passes/kv_cache.py).

The graph's GroupQueryAttention reads rows [0, L] of each layer's buffer (L = resident rows, from the attention
mask's width), writes the new token's key and value at slot L, and rotates it at its `position_ids`. Keys are
stored rotated, so a kept token keeps its original position whatever slot it sits in, and in decode the order of
the rows does not matter. So the runtime keeps at most `budget` rows per layer and key/value head:

- decode: after each step, per layer and head, the policy picks the slot to free (window: the oldest non-sink;
  h2o: the least accumulated attention outside the sinks and the recent tokens; snapkv: the oldest generated token,
  then the weakest prompt selection) and the newest row moves into it: one strided copy over all layers.
- prefill `exact`: the prompt attends to all of itself in chunks, then one compaction keeps `budget` rows per head;
  `stream`: a compaction before every chunk, so memory stays at budget + chunk rows.

Batch 1: heads keep different rows, and one mask sets one resident count per row of the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from .errors import FeedError

POLICIES = ("window", "h2o", "snapkv")
PREFILLS = ("exact", "stream")
SNAPKV_WINDOW = 32  # SnapKV's default observation window
GENERATED = 1e12  # snapkv: generated tokens rank below every prompt selection (oldest first), scores stay exact
# per-slot bookkeeping beside the keys and values, with the value of an empty slot: the position held, the policy's
# score in decode, and during prefill both candidate scores (h2o's accumulated mass, snapkv's pooled window mass)
SLOT_ARRAYS = {"slot_pos": -1, "score": 0.0, "h2o": 0.0, "obs": 0.0}


@dataclass(frozen=True)
class KVBudget:
    """The policy the runtime applies: the manifest's record, or a caller's override of it (checked here)."""

    policy: str
    budget: int | float  # slots, or a fraction of the prompt
    sinks: int = 4
    recent: int | None = None  # None: h2o splits the budget evenly (its paper), snapkv observes 32 tokens
    pool: int = 7
    prefill: str = "exact"

    @classmethod
    def from_dict(cls, d: dict, has_scores: bool) -> "KVBudget":
        known = {"policy", "budget", "sinks", "recent", "pool", "prefill", "scores", "min_slots"}
        if not isinstance(d, dict) or set(d) - known:
            raise FeedError(f"kv_policy takes a dict with keys {sorted(known - {'scores', 'min_slots'})}, or None for "
                            f"the full cache; got {d!r}")
        budget = d.get("budget", 1024)
        budget = budget["fraction"] if isinstance(budget, dict) else budget
        recent = d.get("recent")
        p = cls(d.get("policy", "window"), budget, int(d.get("sinks", 4)), None if recent is None else int(recent),
                int(d.get("pool", 7)), d.get("prefill", "exact"))
        if p.policy not in POLICIES or p.prefill not in PREFILLS:
            raise FeedError(f"kv_policy: policy must be one of {POLICIES} and prefill one of {PREFILLS}")
        if p.policy != "window" and not has_scores:
            raise FeedError(f"kv_policy {p.policy} reads attention probabilities, which this artifact's graph does not "
                            "return (compile it with kv_cache policy = h2o or snapkv)")
        if p.policy == "snapkv" and p.prefill == "stream":
            raise FeedError("kv_policy snapkv selects from the whole prompt: use prefill = \"exact\"")
        fraction = isinstance(p.budget, float) and p.budget < 1
        if isinstance(p.budget, bool) or not isinstance(p.budget, (int, float)) or p.budget <= 0 or (
                not fraction and p.budget < p.min_slots):
            raise FeedError(f"kv_policy budget must be a fraction in (0, 1) or at least {p.min_slots} slots "
                            f"(sinks + the recent tokens it always keeps + 1), got {p.budget!r}")
        return p

    @classmethod
    def keep_all(cls, tokens: int, recent: int | None = None) -> "KVBudget":
        """The full cache as a budget that never evicts (`recent`: the observation window a fork may ask for)."""
        return cls("window", tokens + 1, sinks=0, recent=recent)

    @property
    def observation(self) -> int:
        """snapkv's observation window: the last prompt tokens whose attention picks the prompt positions."""
        return self.recent if self.recent is not None else SNAPKV_WINDOW

    def recent_for(self, slots: int) -> int:
        """The newest tokens always kept at this budget (window keeps newest by rank: none protected here)."""
        if self.policy == "window":
            return 0
        if self.policy == "snapkv":
            return self.observation
        return self.recent if self.recent is not None else max(1, (slots - self.sinks) // 2)

    @property
    def min_slots(self) -> int:
        floor = {"window": 1, "snapkv": self.observation, "h2o": self.recent or 1}[self.policy]
        return self.sinks + floor + 1

    def slots(self, prompt_len: int) -> int:
        if isinstance(self.budget, float) and self.budget < 1:
            return max(self.min_slots, math.ceil(self.budget * prompt_len))
        return int(self.budget)


class PolicyDecoder:
    """One generation (batch 1) under a KV budget: the buffers, which position each slot holds, and the scores."""

    def __init__(self, session: ort.InferenceSession, kv_heads: list[int], head_dim: int, budget: KVBudget,
                 prompt_len: int, max_length: int, min_rows: int = 0):
        self.session, self.policy, self.max_length = session, budget, max_length
        self.budget = budget.slots(prompt_len)
        self.recent = budget.recent_for(self.budget)
        self.kv_heads, self.head_dim, self.min_rows = kv_heads, head_dim, min_rows
        self.layers, self.maxkv = len(kv_heads), max(kv_heads)
        outs = {o.name: o for o in session.get_outputs()}
        self.vocab = int(outs["logits"].shape[2])
        self.heads = [int(outs[f"attention_probs.{i}"].shape[1]) for i in range(self.layers)] if "attention_probs.0" in outs else []
        self._probs_flat = np.empty(0, np.float32)  # every layer's probabilities, grown as needed and reused
        self._uniform = len(set(self.heads)) <= 1 and len(set(kv_heads)) == 1
        self.io = session.io_binding()
        self.L, self.pos, self.prompt_len = 0, 0, prompt_len
        self.peak_rows = 0
        self._bound_shape = None  # (tokens, total) of the call whose inputs and outputs are bound
        self.slot_pos = self.score = None
        self.h2o = self.obs = np.zeros((self.layers, self.maxkv, 0)) if self.heads else None
        self._alloc(max(prompt_len if budget.prefill == "exact" else 0, self.budget + 1))

    # ---- buffers ---------------------------------------------------------------------------------------------------
    def _alloc(self, rows: int, keep: int = 0) -> None:
        """(Re)allocate (layers, 2, 1, maxkv, rows, hd), keeping the first `keep` rows, and bind layer i's key/value
        views (contiguous: heads beyond a layer's own count are unused) as both past and present."""
        rows = max(rows, self.min_rows)
        buf = np.zeros((self.layers, 2, 1, self.maxkv, rows, self.head_dim), np.float32)
        if keep:
            buf[..., :keep, :] = self.buf[..., :keep, :]
        for name, fill in SLOT_ARRAYS.items():  # what each slot holds, beside its key and value
            old = getattr(self, name, None)
            if old is not None or name in ("slot_pos", "score"):
                new = np.full((self.layers, self.maxkv, rows), fill, np.int64 if name == "slot_pos" else np.float64)
                if keep:
                    new[..., :keep] = old[..., :keep]
                setattr(self, name, new)
        self.buf, self.rows = buf, rows
        self.peak_rows = max(self.peak_rows, rows)
        self._values = []
        for i, kv in enumerate(self.kv_heads):
            for j, kind in enumerate(("key", "value")):
                value = ort.OrtValue.ortvalue_from_numpy(buf[i, j, :, :kv])
                self._values.append(value)
                self.io.bind_ortvalue_input(f"past_key_values.{i}.{kind}", value)
                self.io.bind_ortvalue_output(f"present.{i}.{kind}", value)

    @property
    def kv_bytes(self) -> int:
        """Bytes held for keys, values and attention probabilities now."""
        return self.buf.nbytes + self._probs_flat.nbytes

    # ---- one graph call ----------------------------------------------------------------------------------------------
    def _run(self, ids: np.ndarray, want_probs: bool) -> tuple[np.ndarray, list[np.ndarray] | None]:
        s = len(ids)
        if self.pos + s > self.max_length:
            raise FeedError(f"prompt plus new tokens need {self.pos + s} positions; this artifact holds max_length = "
                            f"{self.max_length} (its rotary tables): shorten the prompt or compile a larger max_length")
        if self.L + s > self.rows:
            self._alloc(self.L + s, keep=self.L)
        total = self.L + s
        if (s, total) != self._bound_shape:
            self._bind(s, total)
        self._ids[0], self._positions[0] = ids, np.arange(self.pos, self.pos + s)  # in place: bound memory
        logits, probs = self._logits, self._probs
        self.session.run_with_iobinding(self.io)
        self.slot_pos[..., self.L:total] = np.arange(self.pos, self.pos + s)
        self.L, self.pos = total, self.pos + s
        return logits[0, -1], (probs if want_probs else None)

    def _bind(self, s: int, total: int) -> None:
        """Bind the call's inputs and outputs as numpy memory the runtime owns. In decode with the budget full the
        shapes repeat, so each step only writes the token and its position in place: no binding, no allocation."""
        self._ids, self._positions = np.zeros((1, s), np.int64), np.zeros((1, s), np.int64)
        self._logits = np.empty((1, s, self.vocab), np.float32)
        inputs = {"input_ids": self._ids, "attention_mask": np.ones((1, total), np.int64), "position_ids": self._positions}
        outputs = {"logits": self._logits}
        self._probs = None
        if self.heads:  # the graph computes them either way: written into memory reused call after call
            size = self.layers * max(self.heads) * s * total
            if self._probs_flat.size < size:
                grow = 2 * self._probs_flat.size if s == 1 else 0  # decode: total grows by one per step
                self._probs_flat = np.empty(max(size, grow), np.float32)
            block = self._probs_flat[:size].reshape(self.layers, max(self.heads), s, total)
            self._probs = [block[i, None, :h] for i, h in enumerate(self.heads)]  # (1, heads_i, s, total) views
            outputs.update((f"attention_probs.{i}", p) for i, p in enumerate(self._probs))
            self._probs_block = block
        self._bound_values = []
        for name, array in inputs.items():
            self._bound_values.append(ort.OrtValue.ortvalue_from_numpy(array))
            self.io.bind_ortvalue_input(name, self._bound_values[-1])
        for name, array in outputs.items():
            self._bound_values.append(ort.OrtValue.ortvalue_from_numpy(array))
            self.io.bind_ortvalue_output(name, self._bound_values[-1])
        self._bound_shape = (s, total)

    def _head_mass(self, probs: list[np.ndarray]) -> np.ndarray:
        """Attention each slot received in the last call, summed over its queries and each key/value head's query
        heads: (layers, maxkv, L). One reduction over all layers where they share head counts."""
        if self._uniform:
            kv = self.kv_heads[0]
            block = self._probs_block
            return block.reshape(self.layers, kv, -1, block.shape[-1]).sum(axis=2, dtype=np.float64)
        mass = np.zeros((self.layers, self.maxkv, self.L), np.float64)
        for i, (p, kv) in enumerate(zip(probs, self.kv_heads)):
            mass[i, :kv] = p[0].reshape(kv, -1, p.shape[-1]).sum(axis=1, dtype=np.float64)
        return mass

    # ---- policy ----------------------------------------------------------------------------------------------------
    def _protected(self) -> np.ndarray:
        """Slots no policy frees: the sinks, and (h2o, snapkv) the `recent` newest tokens."""
        pos = self.slot_pos[..., :self.L]
        return (pos < self.policy.sinks) | (pos >= self.pos - self.recent)

    def _rank(self) -> np.ndarray:
        """Higher = keep: window keeps the newest, h2o the most attended, snapkv its prompt selection (during a
        stream prefill h2o ranks by the mass accumulated so far)."""
        pos = self.slot_pos[..., :self.L].astype(np.float64)
        if self.policy.policy == "window":
            return pos
        if self.policy.policy == "h2o":
            return (self.h2o if self.h2o is not None else self.score)[..., :self.L].copy()
        return np.where(pos < self.prompt_len, self.score[..., :self.L], pos - GENERATED)

    def _slot_arrays(self) -> list[str]:
        return [n for n in SLOT_ARRAYS if getattr(self, n, None) is not None]

    def _compact(self, keep: int, rows: int | None = None) -> None:
        """Keep `keep` rows per layer and head (the protected ones, then by rank), in position order, in a buffer of
        `rows` rows (default: this one)."""
        if self.L <= keep:
            if rows and rows > self.rows:
                self._alloc(rows, keep=self.L)
            return
        rank = np.where(self._protected(), np.inf, self._rank())
        idx = np.argpartition(-rank, keep - 1, axis=-1)[..., :keep]
        idx = np.take_along_axis(idx, np.argsort(np.take_along_axis(self.slot_pos, idx, -1), -1), -1)
        kept = np.take_along_axis(self.buf, idx[:, None, None, :, :, None], axis=4)
        slots = {n: np.take_along_axis(getattr(self, n), idx, -1) for n in self._slot_arrays()}
        if rows is not None and rows != self.rows:
            self._alloc(rows)
        self.buf[..., :keep, :] = kept
        for n, values in slots.items():
            arr = getattr(self, n)
            arr[...] = SLOT_ARRAYS[n]
            arr[..., :keep] = values
        self.L = keep

    def _evict_one(self) -> None:
        """The newest row moves into the slot the policy frees, per layer and head (decode: one copy over all)."""
        rank = np.where(self._protected(), np.inf, self._rank())
        free = np.argmin(rank, axis=-1)  # (layers, maxkv)
        li, hi = np.indices(free.shape)
        last = self.L - 1
        self.buf[li, :, 0, hi, free] = self.buf[li, :, 0, hi, last]
        for n in ("slot_pos", "score"):
            arr = getattr(self, n)
            arr[li, hi, free] = arr[:, :, last]
            arr[..., last] = SLOT_ARRAYS[n]
        self.L = last

    def _pooled(self, mass: np.ndarray) -> np.ndarray:
        """SnapKV's pooling: each position's score is the max over `pool` neighbours (keeps spans, not lone tokens)."""
        half = self.policy.pool // 2
        if half == 0:
            return mass
        padded = np.pad(mass, [(0, 0), (0, 0), (half, half)], constant_values=-np.inf)
        windows = np.lib.stride_tricks.sliding_window_view(padded, self.policy.pool, axis=-1)
        return windows.max(-1)

    # ---- generation ------------------------------------------------------------------------------------------------
    def prefill(self, ids: list[int], chunk: int) -> np.ndarray:
        """Feed the prompt; returns the next-token logits (V,). Leaves at most `budget` rows per head."""
        logits = self.feed_prompt(ids, chunk)
        self.finish_prefill()
        return logits

    def feed_prompt(self, ids: list[int], chunk: int) -> np.ndarray:
        """Prefill's first half: the prompt through the graph, in chunks (`stream`: compacting before each). On a
        graph with attention probabilities both scores are kept (h2o's accumulated mass; snapkv's pooled mass from
        the last `recent` prompt tokens, fed as the last call), so one exact prefill can be `fork`ed to any policy."""
        ids = np.asarray(ids, np.int64)
        n, p = len(ids), self.policy
        self.prompt_len = n
        scored = bool(self.heads)
        cuts = list(range(0, n, chunk))
        obs = min(p.observation, n)
        if scored and p.prefill == "exact" and n > obs:  # the last call is the observation window
            cuts = list(range(0, n - obs, chunk)) + [n - obs]
        cuts.append(n)
        if p.prefill == "stream" and self.rows < self.budget + chunk:
            self._alloc(self.budget + chunk)
        logits = None
        for a, b in zip(cuts[:-1], cuts[1:]):
            if p.prefill == "stream" and self.L + (b - a) > self.rows:
                self._compact(self.rows - (b - a))
            logits, probs = self._run(ids[a:b], want_probs=scored)
            if scored:
                mass = self._head_mass(probs)
                self.h2o[..., :self.L] += mass
                if b == n and b - a == obs:
                    self.obs[..., :self.L] = self._pooled(mass)
        return logits.copy()

    def finish_prefill(self) -> None:
        """Prefill's second half: the policy's scores chosen, then one compaction to `budget` rows per head."""
        if self.policy.policy == "h2o":
            self.score = self.h2o.copy()
        elif self.policy.policy == "snapkv":
            self.score = self.obs.copy()
        self._compact(self.budget, rows=max(self.budget + 1, self.min_rows))
        self.h2o = self.obs = None  # decode keeps only the policy's own score
        self._probs_flat, self._probs, self._bound_shape = np.empty(0, np.float32), None, None  # prefill-sized

    def fork(self, policy: KVBudget) -> "PolicyDecoder":
        """A copy of this decoder after `feed_prompt` (exact prefill), under another policy: one prompt, many
        policies and budgets (the benchmark), each from the same full-attention prefill. snapkv's observation window
        is this decoder's `recent` (its last prompt call): the fork must ask for the same."""
        if policy.policy == "snapkv" and policy.observation != self.policy.observation:
            raise FeedError(f"fork: snapkv observing {policy.observation} tokens needs a prefill whose last call was "
                            f"that window; this one's was {self.policy.observation}")
        other = object.__new__(PolicyDecoder)
        other.__dict__.update(self.__dict__)
        other.policy, other.budget = policy, policy.slots(self.prompt_len)
        other.recent = policy.recent_for(other.budget)
        other.io = self.session.io_binding()
        other._bound_shape = None
        other._probs_flat = np.empty(0, np.float32)
        other._alloc(self.rows, keep=self.L)  # its own copies of every array, bound to its own io binding
        return other

    def step(self, token: int) -> np.ndarray:
        """Feed one token; returns its next-token logits (V,), then frees a slot if the budget is full."""
        logits, probs = self._run(np.array([token], np.int64), want_probs=self.policy.policy == "h2o")
        if probs is not None:
            self.score[..., :self.L] += self._head_mass(probs)
        if self.L > self.budget:
            self._evict_one()
        return logits.copy()

    def positions(self) -> np.ndarray:
        """The positions resident in each layer and head, sorted: (layers, maxkv, L)."""
        return np.sort(self.slot_pos[..., :self.L], axis=-1)
