"""kv_cache: a fixed budget of key/value slots for long prompts (StreamingLLM, H2O, SnapKV), compiled into the artifact.

The pass changes no weight. It records the policy on the handle; the fused lowering then gives the graph a
`position_ids` input (a kept token keeps its original rotary position, whatever slot it sits in) and, for the
score-based policies, each layer's attention probabilities as outputs (GroupQueryAttention's `output_qk`). The
torch-free runtime (runtime/kv_policy.py) keeps at most `budget` slots per layer and key/value head and, after
every step, moves the newest row into the slot the policy frees: nothing else is copied.

- `window` (StreamingLLM): the first `sinks` tokens plus the most recent ones.
- `h2o` (heavy hitters): sinks, the `recent` newest tokens, and the slots with the most accumulated attention.
- `snapkv`: at the end of prefill, per head, the prompt positions the last `recent` prompt tokens attend to most
  (scores pooled over `pool` neighbours); decoding then keeps them and rolls the recent window.

Budget: slots (an integer) or a fraction of the prompt (a float in (0, 1)), equal for every layer: one attention
mask sets every layer's resident count in this graph, so per-layer budgets (PyramidKV) are not offered.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from compressor.errors import UsageError
from compressor.models import DecoderAdapter
from compressor.pipeline.pass_base import Pass, PassResult, define_capability, register

POLICIES = ("window", "h2o", "snapkv")
SNAPKV_WINDOW = 32  # SnapKV's default observation window
PREFILLS = ("exact", "stream")


@dataclass
class KVCacheConfig:
    policy: str = field(default="window", metadata={"help": "window (StreamingLLM: sinks + recent), h2o (heavy hitters by accumulated attention + recent) or snapkv (prompt positions the prompt's last tokens attend to, then a rolling window)"})
    budget: float = field(default=1024, metadata={"help": "key/value slots kept per layer and head: an integer, or a fraction of the prompt in (0, 1)"})
    sinks: int = field(default=4, metadata={"help": "first tokens always kept (attention sinks)"})
    recent: int | None = field(default=None, metadata={"help": "newest tokens always kept by h2o (default: half the budget, as its paper) and snapkv (its observation window, default 32); window keeps budget - sinks"})
    pool: int = field(default=7, metadata={"help": "snapkv: scores max-pooled over this many neighbouring positions (odd)"})
    prefill: str = field(default="exact", metadata={"help": "exact (the prompt attends to all of itself, then one compaction) or stream (compaction before every chunk: memory bounded by budget + chunk; not snapkv)"})

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if self.prefill not in PREFILLS:
            raise ValueError(f"prefill must be exact or stream, got {self.prefill!r}")
        if self.policy == "snapkv" and self.prefill == "stream":
            raise ValueError("snapkv selects from the whole prompt at the end of prefill: use prefill = \"exact\"")
        if isinstance(self.budget, bool) or not isinstance(self.budget, (int, float)):
            raise ValueError(f"budget must be a number of slots or a fraction in (0, 1), got {self.budget!r}")
        if isinstance(self.budget, float) and not self.budget.is_integer() and not 0.0 < self.budget < 1.0:
            raise ValueError(f"a fractional budget is the share of the prompt to keep and must lie in (0, 1), got {self.budget}")
        if self.budget >= 1:
            self.budget = int(self.budget)
        if self.budget <= 0:
            raise ValueError(f"budget must be positive, got {self.budget}")
        if self.sinks < 0 or (self.recent is not None and self.recent < 1) or self.pool < 1 or self.pool % 2 == 0:
            raise ValueError("sinks must be >= 0, recent >= 1 and pool an odd number >= 1")
        floor = self.min_slots
        if isinstance(self.budget, int) and self.budget < floor:
            raise ValueError(f"budget {self.budget} is smaller than what the policy always keeps ({self.kept_text}, "
                             f"{floor} slots): raise budget or lower sinks/recent")

    @property
    def always_recent(self) -> int:
        """Newest tokens every budget keeps: snapkv's observation window, h2o's `recent` if given."""
        if self.policy == "snapkv":
            return self.recent if self.recent is not None else SNAPKV_WINDOW
        return self.recent if self.policy == "h2o" and self.recent is not None else 1

    @property
    def min_slots(self) -> int:
        """Slots every budget must reach: the sinks, the always-kept recent tokens, and one to choose."""
        return self.sinks + self.always_recent + 1

    @property
    def kept_text(self) -> str:
        return f"sinks {self.sinks} + recent {self.always_recent} + 1"

    def to_manifest(self) -> dict:
        """What the runtime reads (preprocess.kv_policy)."""
        budget = self.budget if isinstance(self.budget, int) else {"fraction": self.budget}
        return {"policy": self.policy, "budget": budget, "sinks": self.sinks, "recent": self.recent,
                "pool": self.pool, "prefill": self.prefill, "scores": self.policy != "window",
                "min_slots": self.min_slots}


def _policy_recorded(handle, _before) -> bool:
    return isinstance(getattr(handle, "kv_policy", None), dict) and handle.kv_policy.get("policy") in POLICIES


define_capability("kv_policy", "a KV-cache policy is recorded for the lowering and the runtime", _policy_recorded)


@register
class KVCache(Pass):
    name = "kv_cache"
    summary = "keep a fixed budget of key/value slots while decoding long prompts (StreamingLLM window, H2O, SnapKV)"
    Config = KVCacheConfig
    ensures = frozenset({"kv_policy"})
    decoder_only = "it budgets a language model's key/value cache"

    def check(self, handle) -> None:
        super().check(handle)
        ad = handle.adapter
        if not isinstance(ad, DecoderAdapter):
            raise UsageError(f"pass 'kv_cache' applies to language models with a KV cache; this is "
                             f"{handle.target.label} ({ad.family}): remove the pass")
        windows = sorted({layer.sliding_window for layer in ad.layers if layer.sliding_window})
        if windows and self.config.policy != "window":
            raise UsageError(f"pass 'kv_cache': {self.config.policy} needs attention probabilities, which onnxruntime's "
                             f"GroupQueryAttention does not return for sliding-window layers ({ad.family}); "
                             "use policy = \"window\"")
        budget = self.config.budget
        if windows and (not isinstance(budget, int) or budget >= windows[0]):
            raise UsageError(f"pass 'kv_cache': {ad.family}'s sliding-window layers attend to their last {windows[0]} "
                             f"slots, so the budget must be a number of slots below {windows[0]} (got {budget})")

    def run(self, handle, ctx) -> PassResult:
        handle.kv_policy = self.config.to_manifest()
        return PassResult(modified=True, info=dict(handle.kv_policy))
