"""Decoding over one preallocated KV buffer per layer, updated in place (fused decoder artifacts).

The fused graph's GroupQueryAttention writes each step's keys and values into the buffer it reads the past from
when past and present are the same memory, so the runtime binds one (B, kv, max_length, head_dim) buffer as both
(IO binding) and feeds only the new tokens: nothing is concatenated or copied per step. Rows are right padded: row
b's tokens fill buffer slots [0, length_b), and the attention mask is 1 on a row's real tokens, so the graph reads
each row's length (seqlens_k) from it. Long prompts are prefilled in chunks.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from .errors import FeedError


class SharedKVDecoder:
    """One generation's state: the KV buffers, each row's length, and the IO binding."""

    def __init__(self, session: ort.InferenceSession, kv_heads: list[int], head_dim: int, batch: int, max_length: int):
        self.session, self.max_length = session, max_length
        self.lengths = np.zeros(batch, np.int64)
        self.io = session.io_binding()
        self.vocab = int(next(o.shape[2] for o in session.get_outputs() if o.name == "logits"))
        self.position_ids = any(i.name == "position_ids" for i in session.get_inputs())
        self._step_logits = self._step_value = self._bound = None  # (B, 1, V): bound once, reused by every step
        self._buffers = []  # numpy arrays the OrtValues wrap: kept alive as long as the binding
        for i, kv in enumerate(kv_heads):
            for kind in ("key", "value"):
                array = np.zeros((batch, kv, max_length, head_dim), np.float32)
                value = ort.OrtValue.ortvalue_from_numpy(array)
                self._buffers.append(array)
                self.io.bind_ortvalue_input(f"past_key_values.{i}.{kind}", value)
                self.io.bind_ortvalue_output(f"present.{i}.{kind}", value)

    def _run(self, ids: np.ndarray, new_lengths: np.ndarray) -> np.ndarray:
        """Append ids (B, S) right-padded: row b's real new tokens are its first new_lengths[b]; returns logits."""
        total = self.lengths + new_lengths
        if total.max() > self.max_length:
            raise FeedError(f"prompt plus new tokens need {int(total.max())} positions; this generation holds "
                            f"{self.max_length} (the artifact's [export] max_length caps it)")
        width = int(max(total.max(), self.lengths.max() + ids.shape[1]))
        mask = (np.arange(width)[None, :] < total[:, None]).astype(np.int64)
        self.io.bind_cpu_input("input_ids", np.ascontiguousarray(ids, dtype=np.int64))
        self.io.bind_cpu_input("attention_mask", mask)
        if self.position_ids:  # a KV-policy graph with its full cache: each row's positions continue its length
            self.io.bind_cpu_input("position_ids", self.lengths[:, None] + np.arange(ids.shape[1], dtype=np.int64))
        logits = self._logits_buffer(ids.shape)
        self.session.run_with_iobinding(self.io)
        self.lengths = total
        return logits

    def _logits_buffer(self, shape) -> np.ndarray:
        """A numpy array the graph writes its logits into (no per-step output objects: reading them back through
        get_outputs() wraps every bound output, the KV buffers included)."""
        if shape[1] == 1 and self._step_logits is not None:
            if self._bound is not self._step_logits:
                self.io.bind_ortvalue_output("logits", self._step_value)
                self._bound = self._step_logits
            return self._step_logits
        array = np.empty((shape[0], shape[1], self.vocab), np.float32)
        value = ort.OrtValue.ortvalue_from_numpy(array)
        self.io.bind_ortvalue_output("logits", value)
        self._bound = array
        if shape[1] == 1:
            self._step_logits, self._step_value = array, value
        return array

    def prefill(self, prompts: list[list[int]], chunk: int) -> np.ndarray:
        """Feed every row's prompt; returns each row's next-token logits (B, V). Rows of equal length are fed in
        chunks of `chunk` tokens; rows of different lengths in one right-padded call."""
        lengths = np.array([len(p) for p in prompts], np.int64)
        if len(set(lengths.tolist())) > 1 or lengths[0] <= chunk:
            ids = np.zeros((len(prompts), int(lengths.max())), np.int64)
            for b, p in enumerate(prompts):
                ids[b, :len(p)] = p
            logits = self._run(ids, lengths)
            return logits[np.arange(len(prompts)), lengths - 1]
        ids = np.array(prompts, np.int64)
        for start in range(0, ids.shape[1], chunk):
            part = ids[:, start:start + chunk]
            logits = self._run(part, np.full(len(prompts), part.shape[1], np.int64))
        return logits[:, -1]

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """Feed one token per row; returns next-token logits (B, V)."""
        return self._run(tokens.reshape(-1, 1), np.ones(len(tokens), np.int64))[:, -1].copy()  # the buffer is reused
