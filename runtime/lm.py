"""Causal language models from an artifact: logits, perplexity and generation with a KV cache, torch-free.

One ONNX graph serves prefill and decode: past key/values in, present key/values out. Two layouts:
- fused artifacts (`preprocess.kv_cache == "shared"`, onnxruntime's GroupQueryAttention): the runtime binds one
  preallocated buffer per layer as both past and present and feeds only new tokens (decode.py); rows right padded.
- generic artifacts (traced graph): a prefill passes one dummy past slot that the attention mask marks absent
  (position 0 of the mask is 0), and each step's present is fed back as the next past.
"""

from __future__ import annotations

import numbers
from typing import Callable, Iterator

import numpy as np

from .decode import SharedKVDecoder
from .errors import FeedError, FeedTypeError
from .kv_policy import KVBudget, PolicyDecoder
from .model import CompiledModel
from .preprocess import check_text


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def sample_next(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """Greedy when temperature <= 0, else temperature + nucleus (top-p) sampling."""
    if temperature <= 0:
        return int(np.argmax(logits))
    probs = np.exp(_log_softmax(logits.astype(np.float64) / temperature))
    order = np.argsort(-probs)
    cumulative = np.cumsum(probs[order])
    keep = order[: int(np.searchsorted(cumulative, top_p) + 1)]
    p = probs[keep] / probs[keep].sum()
    return int(rng.choice(keep, p=p))


def token_ids(ids, call: str) -> np.ndarray:
    """Integer token ids as int64, or one line saying what came instead (never numpy's own error)."""
    if isinstance(ids, (str, bytes)):
        raise FeedTypeError(f"{call} takes token ids (ints), got {type(ids).__name__}")
    try:
        arr = np.asarray(ids)
    except (TypeError, ValueError) as e:
        raise FeedTypeError(f"{call} takes token ids shaped (S,) or (B, S): {e}") from None
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise FeedTypeError(f"{call} takes integer token ids, got {arr.dtype}")
    return arr.astype(np.int64)


def _check_number(name: str, value, integer: bool = False) -> None:
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        raise FeedTypeError(f"{name} must be {'an int' if integer else 'a number'}, got {type(value).__name__}")


class CausalLM(CompiledModel):
    def __init__(self, folder, manifest, providers=None, threads=None, allow_fallback=False, *, strict=False):
        super().__init__(folder, manifest, providers, threads, allow_fallback, strict=strict)
        pre = self._pre
        self.num_layers, self.kv_heads, self.head_dim = pre["num_layers"], pre["kv_heads"], pre["head_dim"]
        self.eos_token_ids = set(pre.get("eos_token_ids") or [])
        self.shared_kv = pre.get("kv_cache") == "shared"
        self.max_length = pre.get("max_length")
        self.prefill_chunk = int(pre.get("prefill_chunk") or 256)
        self.positional = "position_ids" in self.inputs  # a KV-policy graph: the runtime gives rotary positions
        self._scores = any(o["name"].startswith("attention_probs.") for o in manifest["outputs"])
        compiled = pre.get("kv_policy")  # (a dense baseline read with this manifest has no position_ids: no policy)
        self._kv_policy = KVBudget.from_dict(compiled, self._scores) if compiled and self.positional else None

    @property
    def kv_policy(self) -> dict | None:
        """The KV-cache policy generation applies (compiled into the artifact by the kv_cache pass); None keeps
        every token (the full cache). Settable: None, or a dict overriding the compiled one's keys (e.g. budget)."""
        return None if self._kv_policy is None else dict(self._kv_policy.__dict__)

    @kv_policy.setter
    def kv_policy(self, value: dict | None) -> None:
        if value is not None and not self.positional:
            raise FeedError("this artifact was compiled without a KV-cache policy (no position_ids input); compile it "
                            "with the kv_cache pass")
        compiled = self._pre.get("kv_policy") or {}
        self._kv_policy = None if value is None else KVBudget.from_dict({**compiled, **value}, self._scores)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise FeedTypeError(f"encode() takes a string, got {type(text).__name__}")
        check_text([text], "encode()", single=True)
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode(token_ids(ids, "decode()").reshape(-1).tolist(), skip_special_tokens=True)

    @property
    def _kv_per_block(self) -> list[int]:
        return self.kv_heads if isinstance(self.kv_heads, list) else [self.kv_heads] * self.num_layers

    def _empty_past(self, batch: int) -> dict[str, np.ndarray]:
        slots = 0 if self.shared_kv else 1  # the generic graph's one masked dummy slot
        return {f"past_key_values.{i}.{k}": np.zeros((batch, kv, slots, self.head_dim), dtype=np.float32)
                for i, kv in enumerate(self._kv_per_block) for k in ("key", "value")}

    def _prefill_mask(self, shape: tuple[int, int]) -> np.ndarray:
        ones = np.ones(shape, np.int64)
        return ones if self.shared_kv else np.concatenate([np.zeros((shape[0], 1), np.int64), ones], axis=1)

    def _step(self, ids: np.ndarray, mask: np.ndarray, past: dict) -> tuple[np.ndarray, dict]:
        feeds = {"input_ids": ids, "attention_mask": mask, **past}
        if self.positional:  # (prefill from an empty cache: positions 0..S-1)
            feeds["position_ids"] = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape).copy()
        out = self.run(feeds)
        present = {f"past_key_values.{i}.{k}": out[f"present.{i}.{k}"] for i in range(self.num_layers) for k in ("key", "value")}
        return out["logits"], present

    def logits(self, ids) -> np.ndarray:
        """Next-token logits (B, S, V) for token ids (B, S) or (S,), computed in one prefill."""
        ids = token_ids(ids, "logits()")
        single = ids.ndim == 1
        ids = ids[None] if single else ids
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise FeedError("logits() takes token ids shaped (S,) or (B, S) with S >= 1")
        if self.shared_kv and ids.shape[1] > self.max_length:
            raise FeedError(f"logits() of {ids.shape[1]} tokens: this artifact holds max_length = {self.max_length} "
                            "positions (compile with a larger [export] max_length)")
        out, _ = self._step(ids, self._prefill_mask(ids.shape), self._empty_past(ids.shape[0]))
        return out[0] if single else out

    def perplexity(self, windows: np.ndarray) -> float:
        """exp(mean next-token NLL) over windows of token ids (N, L), one window at a time."""
        total, count = 0.0, 0
        windows = token_ids(windows, "perplexity()")
        if windows.ndim != 2 or windows.shape[1] < 2:
            raise FeedError("perplexity() takes windows of token ids shaped (N, L) with L >= 2")
        for w in windows:
            logp = _log_softmax(self.logits(w)[:-1].astype(np.float32))
            total -= float(logp[np.arange(len(w) - 1), w[1:]].astype(np.float64).sum())
            count += len(w) - 1
        return float(np.exp(total / count))

    def _capacity(self, prompts: list[list[int]], max_new_tokens: int) -> int:
        """KV buffer slots for one generation: what it can reach (not the artifact's whole max_length), at least the
        widest sliding window (GroupQueryAttention wants that much room), at most max_length (longer is refused)."""
        need = max(len(p) for p in prompts) + max_new_tokens
        return int(min(self.max_length, max(need, int(self._pre.get("min_kv_slots") or 0))))

    @property
    def policy_chunk(self) -> int:
        """Prompt tokens per call on a KV-policy graph: fewer where each call also returns attention probabilities
        (their size is chunk x prompt per head and layer)."""
        return min(self.prefill_chunk, 64) if self._scores else self.prefill_chunk

    def policy_decoder(self, prompt_len: int, max_new_tokens: int) -> PolicyDecoder:
        """A batch-1 decoder for a KV-policy graph: the compiled (or set) policy, or with kv_policy = None the
        full cache (a budget that never evicts), on the same graph and code path."""
        return self._decoder(self._kv_policy or KVBudget.keep_all(prompt_len + max_new_tokens), prompt_len)

    def _decoder(self, policy: KVBudget, prompt_len: int) -> PolicyDecoder:
        return PolicyDecoder(self.session, self._kv_per_block, self.head_dim, policy, prompt_len, self.max_length,
                             int(self._pre.get("min_kv_slots") or 0))

    def forks(self, prompt, max_new_tokens: int, policies: list) -> tuple[np.ndarray, list[PolicyDecoder]]:
        """One exact, full-attention prefill of `prompt`, forked into a decoder per entry of `policies` (a dict of
        kv_policy keys over the compiled policy, or None for the full cache): the next-token logits and the decoders,
        each as its own exact prefill would leave it. How the benchmarks and validation compare policies on a prompt
        without paying its prefill once per policy."""
        ids = self._prompt_ids(prompt)
        if not self.positional:
            raise FeedError("forks() needs an artifact compiled with a KV-cache policy (the kv_cache pass)")
        compiled = self._pre.get("kv_policy") or {}
        tokens = len(ids) + max_new_tokens
        resolved = [KVBudget.keep_all(tokens) if p is None else KVBudget.from_dict({**compiled, **p}, self._scores)
                    for p in policies]
        snap = next((b.observation for b in resolved if b.policy == "snapkv"), None)
        decoder = self._decoder(KVBudget.keep_all(tokens, recent=snap), len(ids))
        logits = decoder.feed_prompt(ids, self.policy_chunk)
        out = []
        for b in resolved:
            fork = decoder.fork(b)
            fork.finish_prefill()
            out.append(fork)
        return logits, out

    def continuation_logprobs(self, prompt, continuation) -> np.ndarray:
        """log p(continuation[i] | prompt, continuation[:i]) for each token, fed one at a time through the KV
        policy (teacher forcing): how much the policy's forgetting costs on real text."""
        ids = self._prompt_ids(prompt)
        cont = token_ids(continuation, "continuation_logprobs()").reshape(-1)
        if not self.positional:
            full = np.array(ids + cont.tolist(), np.int64)
            logp = _log_softmax(self.logits(full)[len(ids) - 1:-1].astype(np.float32))
            return logp[np.arange(len(cont)), cont]
        decoder = self.policy_decoder(len(ids), len(cont))
        logits = decoder.prefill(ids, self.policy_chunk)
        out = np.empty(len(cont), np.float64)
        for i, t in enumerate(cont):
            out[i] = _log_softmax(logits[None].astype(np.float32))[0, t]
            if i + 1 < len(cont):
                logits = decoder.step(int(t))
        return out

    def _prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            ids = self.encode(check_text([prompt], "generate()", single=True)[0])
        elif isinstance(prompt, (list, tuple, np.ndarray)):
            ids = token_ids(prompt, "generate()").reshape(-1).tolist()
        else:
            raise FeedTypeError(f"generate() takes a prompt as text or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise FeedError("generate() needs a non-empty prompt")
        return ids

    @staticmethod
    def _check_sampling(max_new_tokens, temperature, top_p, seed) -> None:
        _check_number("max_new_tokens", max_new_tokens, integer=True)
        _check_number("temperature", temperature)
        _check_number("top_p", top_p)
        if seed is not None:
            _check_number("seed", seed, integer=True)
        if max_new_tokens < 0 or not 0.0 < top_p <= 1.0:
            raise FeedError("max_new_tokens must be >= 0 and top_p in (0, 1]")

    def stream(self, prompt, max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
               seed: int | None = None, stop_on_eos: bool = True) -> Iterator[int]:
        """Yield generated token ids one at a time (prompt: text or token ids)."""
        ids = self._prompt_ids(prompt)
        self._check_sampling(max_new_tokens, temperature, top_p, seed)
        rng = np.random.default_rng(seed)
        if self.shared_kv:
            if max_new_tokens == 0:
                return
            if self.positional:
                decoder = self.policy_decoder(len(ids), max_new_tokens)
                logits = decoder.prefill(ids, self.policy_chunk)
            else:
                decoder = SharedKVDecoder(self.session, self._kv_per_block, self.head_dim, 1,
                                          self._capacity([ids], max_new_tokens))
                logits = decoder.prefill([ids], self.prefill_chunk)[0]
            for n in range(max_new_tokens):
                token = sample_next(logits, temperature, top_p, rng)
                if stop_on_eos and token in self.eos_token_ids:
                    return
                yield token
                if n + 1 < max_new_tokens:
                    logits = decoder.step(token) if self.positional else decoder.step(np.array([token], np.int64))[0]
            return
        x = np.array([ids], dtype=np.int64)
        mask = self._prefill_mask(x.shape)
        past = self._empty_past(1)
        for _ in range(max_new_tokens):
            logits, past = self._step(x, mask, past)
            token = sample_next(logits[0, -1], temperature, top_p, rng)
            if stop_on_eos and token in self.eos_token_ids:
                return
            yield token
            x = np.array([[token]], dtype=np.int64)
            mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)

    def generate_batch(self, prompts: list, max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
                       seed: int | None = None, stop_on_eos: bool = True) -> list:
        """Continue several prompts at once (one batched prefill, then one batched step per token); a row stops at
        its end-of-sequence token. Text in, text out (token ids in, token ids out), in prompt order."""
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise FeedTypeError("generate_batch() takes a non-empty list of prompts (texts or token-id lists)")
        ids = [self._prompt_ids(p) for p in prompts]
        self._check_sampling(max_new_tokens, temperature, top_p, seed)
        if not self.shared_kv or self.positional:  # one prompt at a time: the generic graph has no right-padded
            # batching, and a KV policy keeps different slots per row
            outs = [list(self.stream(p, max_new_tokens, temperature, top_p, seed, stop_on_eos)) for p in ids]
        else:
            rng = np.random.default_rng(seed)
            outs = [[] for _ in ids]
            done = np.zeros(len(ids), bool)
            decoder = SharedKVDecoder(self.session, self._kv_per_block, self.head_dim, len(ids),
                                      self._capacity(ids, max_new_tokens))
            logits = decoder.prefill(ids, self.prefill_chunk) if max_new_tokens else None
            for n in range(max_new_tokens):
                tokens = np.array([sample_next(row, temperature, top_p, rng) for row in logits], np.int64)
                for b, t in enumerate(tokens):
                    if not done[b]:
                        if stop_on_eos and t in self.eos_token_ids:
                            done[b] = True
                        else:
                            outs[b].append(int(t))
                if done.all() or n + 1 == max_new_tokens:
                    break
                logits = decoder.step(tokens)
        return [self.decode(o) if isinstance(p, str) else o for p, o in zip(prompts, outs)]

    def generate(self, prompt, max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, stop_on_eos: bool = True, on_text: Callable[[str], None] | None = None):
        """Continue a prompt. Text in, text out (token ids in, token ids out); on_text streams text pieces."""
        tokens, shown = [], ""
        for token in self.stream(prompt, max_new_tokens, temperature, top_p, seed, stop_on_eos):
            tokens.append(token)
            if on_text is not None:
                text = self.decode(tokens)
                on_text(text[len(shown):])
                shown = text
        return self.decode(tokens) if isinstance(prompt, str) else tokens
