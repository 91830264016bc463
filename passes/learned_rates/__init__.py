"""learned_rates: per-layer pruning and merging counts learned under a cost budget (DiffRate, ICCV 2023), made a
compiler step.

Every block gets a distribution over kept-token counts for pruning (class-attention ranking) and one for merging
(ToMe's bipartite matching); the model's weights stay frozen and only these distributions train, on calibration
inputs, to keep the output close to the dense model's (1 - cosine of the pooled outputs plus an MSE between
standardised final hidden states) while a penalty 5 x (cost fraction - target)^2 (after a warm-up) pulls the
expected cost to the budget (a latency budget is first turned into the FLOPs fraction predicted to meet it, from
two onnxruntime timings of the real graph: latency.py). The search runs the model with masks instead of removal (search.py), so the counts get
gradients. DiffRate starts from uniform rates and searches for 3 ImageNet epochs; with a few hundred calibration
inputs the search starts instead from the best of token_merge's hand schedules at the budget (scored by the same
loss) and refines it. Its result is a plain static schedule (`prunes`, `merges` per layer) stored in the token plan and in this
pass's record, compiled like token_merge's. The rounded schedule is finally moved onto the budget: every layer's
distribution is tilted by one shared amount (towards fewer tokens if over budget, more if under) until the schedule's
FLOPs are the largest not above the target, so the budget holds exactly whatever the few search steps reached.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from compressor.pipeline.progress import track
from compressor.errors import UsageError
from compressor.models import PAD
from compressor.pipeline.pass_base import Pass, PassResult, register
from compressor.program.encoder import EncoderProgram, TokenPlan

from compressor.program.token_cost import TokenFlops, hard_counts, smallest_rate
from .latency import flops_for_latency, measured_ratio, retarget
from .rates import KeptCounts
from .search import EPS, layer_counts, search_forward

PENALTY = 5.0  # weight of (cost fraction - target)^2, as in DiffRate (there in GFLOPs)
WARMUP = 0.1  # fraction of the steps before the penalty applies
DECAYS = (1.0, 0.9, 0.7, 0.5)  # hand schedules the search may start from (token_merge's decay)


@dataclass
class LearnedRatesConfig:
    flops: float | None = field(default=None, metadata={"help": "keep this fraction of the dense FLOPs, in (0, 1), e.g. 0.5"})
    latency: float | None = field(default=None, metadata={"help": "keep this fraction of the dense model's onnxruntime latency at the compiled shapes, measured here (see latency.py); give flops or latency"})
    threads: int = field(default=2, metadata={"help": "onnxruntime threads when measuring a latency budget (as the deployment will run)"})
    prune: bool | None = field(default=None, metadata={"help": "learn pruning counts (class-attention ranking); default: on for models pooled from a class token"})
    merge: bool = field(default=True, metadata={"help": "learn merging counts (ToMe bipartite matching)"})
    steps: int = field(default=60, metadata={"help": "optimizer steps on the rates (weights stay frozen)"})
    batch: int = field(default=4, metadata={"help": "calibration inputs per step"})
    calibration_samples: int = field(default=240, metadata={"help": "calibration inputs the steps cycle through (Wikipedia paragraphs cut to random lengths, or Fashion-MNIST training images from index 5000)"})
    lr: float = field(default=0.1, metadata={"help": "Adam learning rate of the rate logits"})
    granularity: int = field(default=4, metadata={"help": "candidate kept counts every this many tokens"})
    hidden_weight: float = field(default=1.0, metadata={"help": "weight of the MSE between standardised final hidden states beside 1 - pooled cosine; 0: pooled only"})
    proportional_attention: bool = field(default=True, metadata={"help": "add log(token size) to attention logits (as token_merge)"})
    seed: int = field(default=0, metadata={"help": "seed of the calibration draw and its order"})

    def __post_init__(self):
        if (self.flops is None) == (self.latency is None):
            raise ValueError("give exactly one budget: flops or latency (a fraction of the dense model's to keep)")
        target = self.flops if self.flops is not None else self.latency
        if not 0.0 < target < 1.0:
            raise ValueError(f"the budget is a fraction of the dense cost to keep and must lie strictly between 0 and 1, got {target}")
        if self.prune is False and not self.merge:
            raise ValueError("prune and merge are both off: nothing to learn")
        if self.steps < 1 or self.batch < 1 or self.calibration_samples < 1 or self.granularity < 1:
            raise ValueError("steps, batch, calibration_samples and granularity must be >= 1")
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if not 0.0 < self.lr < 10.0 or self.hidden_weight < 0:
            raise ValueError("lr must lie in (0, 10) and hidden_weight be >= 0")


@register
class LearnedRates(Pass):
    name = "learned_rates"
    summary = "DiffRate: per-layer pruning and merging counts learned under a FLOPs or measured latency budget, weights frozen"
    Config = LearnedRatesConfig
    requires = frozenset({"encoder"})
    ensures = frozenset({"token_plan"})

    def check(self, handle) -> None:
        super().check(handle)
        cfg: LearnedRatesConfig = self.config
        if cfg.prune and not handle.adapter.has_class_token:
            raise UsageError(f"learned_rates: prune = true needs a model pooled from a class token; this "
                             f"{handle.adapter.family} model pools otherwise (use prune = false: merging only)")
        if handle.plan.active:
            raise UsageError("learned_rates sets the whole token schedule: use it instead of token_merge/token_prune, "
                             "not after them")

    def run(self, handle) -> PassResult:
        cfg: LearnedRatesConfig = self.config
        ad = handle.adapter
        tokens, layers, protected = handle.num_tokens, handle.num_layers, ad.protected_per_sample
        use_prune = ad.has_class_token if cfg.prune is None else cfg.prune
        floor = protected + 2
        prune = KeptCounts(layers, tokens, floor, cfg.granularity) if use_prune else None
        merge = KeptCounts(layers, tokens, floor, cfg.granularity) if cfg.merge else None
        cost = TokenFlops.of(handle)
        start = time.perf_counter()
        target, latency = cfg.flops, None
        if cfg.latency is not None:
            target, latency = flops_for_latency(handle, cost, cfg.latency, cfg.threads, cfg.proportional_attention)
        inputs, teacher = calibration(handle, cfg)
        ad.model.eval()
        ad.model.requires_grad_(False)
        hand = warm_start(ad, prune, merge, inputs, teacher, cfg, cost, target)
        params = [m.logits for m in (prune, merge) if m is not None]
        opt = torch.optim.Adam(params, lr=cfg.lr)
        g = torch.Generator().manual_seed(cfg.seed)
        epochs = -(-cfg.steps * cfg.batch // cfg.calibration_samples)
        order = torch.cat([torch.randperm(cfg.calibration_samples, generator=g) for _ in range(epochs)])
        trace = []
        for step in track(range(cfg.steps), "learning rates (search steps)"):
            idx = order[step * cfg.batch:(step + 1) * cfg.batch]
            pooled, stream, sched = search_forward(ad, tuple(t[idx] for t in inputs), prune, merge, cfg.proportional_attention)
            fidelity = distill_loss(pooled, stream, teacher[0][idx], teacher[1][idx], cfg.hidden_weight)
            fraction = cost.fraction(sched.counts)
            loss = fidelity
            if step >= WARMUP * cfg.steps:
                loss = loss + PENALTY * (fraction - target) ** 2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            trace.append((fidelity.item(), fraction.item()))
        search_seconds = time.perf_counter() - start
        learned = schedule_at(prune, merge, tokens, protected, 0.0)
        learned_fraction = cost.fraction(hard_counts(*learned, tokens))
        attempts = []
        while True:
            try:
                tilt, (prunes, merges) = fit_budget(prune, merge, tokens, protected, cost, target)
            except UsageError:
                if not attempts:
                    raise
                target = attempts[-1]["flops_target"]  # a re-drawn target out of reach: keep the last schedule
                break
            handle.plan = TokenPlan(merges=merges, prunes=prunes if use_prune else [],
                                    proportional_attention=cfg.proportional_attention)
            check_schedule(handle, prunes, merges)
            fraction = cost.fraction(hard_counts(prunes, merges, tokens))
            if latency is None:
                break
            attempts.append({"flops_target": round(target, 4), "flops_fraction": round(fraction, 4), **measured_ratio(handle, cfg.threads)})
            again = retarget(attempts, cfg.latency)  # missed by more than the tolerance: tilt the rates again
            if again is None:
                break
            target = again
        head = max(1, len(trace) // 10)
        if latency is not None:
            latency = {"keep": cfg.latency, **latency, **attempts[-1], "attempts": attempts,
                       "predicted_ratio": round(latency["fixed_fraction"] + (1 - latency["fixed_fraction"]) * attempts[0]["flops_fraction"], 4)}
        return PassResult(modified=handle.plan.active, info={
            "latency": latency,
            "prunes": prunes if use_prune else [],
            "merges": merges,
            "schedule": merges,
            "token_counts": handle.plan.token_counts(tokens, layers),
            "prune_by": "cls_attention" if use_prune else None,
            "flops_target": target,
            "flops_fraction": round(fraction, 4),
            "flops_fraction_search": round(learned_fraction, 4),
            "tilt": round(tilt, 4),
            "start": hand,
            "loss_first": sum(t[0] for t in trace[:head]) / head,
            "loss_last": sum(t[0] for t in trace[-head:]) / head,
            "steps": cfg.steps,
            "search_seconds": round(search_seconds, 1),
            "device": f"cpu ({torch.get_num_threads()} threads)",
        })


def calibration(handle, cfg: LearnedRatesConfig):
    """Calibration inputs and the dense model's (pooled, final hidden states) on them."""
    from compressor.passes.distill import random_lengths
    from compressor.passes.pruning.calibration import calibration_batches

    try:
        (inputs,) = calibration_batches(handle, cfg.calibration_samples, cfg.calibration_samples, seed=cfg.seed)
    except UsageError as e:
        raise UsageError(f"learned_rates: {e}") from None
    if handle.adapter.modality == "text":  # short inputs too, where padding merges first
        inputs = random_lengths(handle.adapter, inputs, torch.Generator().manual_seed(cfg.seed))
    dense = EncoderProgram(handle.adapter, TokenPlan())
    pooled, hidden = [], []
    with torch.no_grad():
        for i in range(0, cfg.calibration_samples, 16):
            out = dense.encode(*(t[i:i + 16] for t in inputs))
            pooled.append(out.pooled)
            hidden.append(out.hidden)
    return inputs, (torch.cat(pooled), torch.cat(hidden))


def distill_loss(pooled, stream, t_pooled, t_hidden, hidden_weight: float) -> torch.Tensor:
    """1 - cosine of the pooled outputs, plus `hidden_weight` x the MSE between per-token standardised final hidden
    states of the live tokens (the teacher's averaged over the input tokens each one holds). The token weights are
    not differentiated: dropping a token must not lower the loss by hiding its error."""
    loss = 1.0 - F.cosine_similarity(pooled, t_pooled, dim=-1).mean()
    if not hidden_weight:
        return loss
    t = stream.groups @ t_hidden / stream.groups.sum(dim=-1, keepdim=True).clamp(min=EPS)
    c = t.shape[-1:]
    err = (F.layer_norm(stream.x, c) - F.layer_norm(t, c)).pow(2).mean(dim=-1)
    w = (stream.size[..., 0] * stream.mask * (stream.kinds != PAD)).detach()
    return loss + hidden_weight * (err * w).sum() / w.sum().clamp(min=1.0)


def hand_schedules(tokens: int, layers: int, protected: int, cost: TokenFlops, target: float) -> list[list[int]]:
    """token_merge's constant schedules (decay 1, 0.9, 0.7, 0.5), each with the smallest first-layer r meeting the
    budget, as per-layer reduction counts."""
    from compressor.passes.token_merge import constant_schedule

    out = []
    for decay in DECAYS:
        found = smallest_rate(lambda r: constant_schedule(r, tokens, layers, protected, decay),
                              lambda s: cost.fraction(hard_counts([0] * layers, s, tokens)) <= target, tokens, start=1)
        if found is not None:
            out.append(found)
    return out or [constant_schedule(tokens, tokens, layers, protected)]


def warm_start(ad, prune, merge, inputs, teacher, cfg, cost: TokenFlops, target: float) -> dict:
    """Centre the rates on the best hand schedule: token_merge's constant schedules at the budget, as merging and
    (where pruning is learned) as pruning from the second block, each scored by the search loss on the first
    calibration batch; the other reduction starts at none. Returns the chosen start and every start's loss."""
    layers, protected = len(ad.layers), ad.protected_per_sample
    tokens = int((merge or prune).candidates[0])
    starts = []
    for schedule in hand_schedules(tokens, layers, protected, cost, target):
        if merge is not None:
            starts.append(("merge", schedule))
        if prune is not None:
            starts.append(("prune", [0] + schedule[:-1]))  # the first block never prunes
    x = tuple(t[:cfg.batch] for t in inputs)
    scored = []
    for kind, schedule in starts:
        start_rates(prune, merge, kind, schedule, tokens, layers)
        with torch.no_grad():
            pooled, stream, _ = search_forward(ad, x, prune, merge, cfg.proportional_attention)
            loss = distill_loss(pooled, stream, teacher[0][:cfg.batch], teacher[1][:cfg.batch], cfg.hidden_weight)
        scored.append((loss.item(), kind, schedule))
    loss, kind, schedule = min(scored, key=lambda t: t[0])
    start_rates(prune, merge, kind, schedule, tokens, layers)
    return {"kind": kind, "schedule": schedule, "loss": round(loss, 5),
            "candidates": [{"kind": k, "first": s[0], "loss": round(v, 5)} for v, k, s in scored]}


def start_rates(prune, merge, kind: str, schedule: list[int], tokens: int, layers: int) -> None:
    kept = [tokens - sum(schedule[:i + 1]) for i in range(layers)]
    for rates, name in ((merge, "merge"), (prune, "prune")):
        if rates is not None:
            rates.start_at(kept if name == kind else [tokens] * layers)


def schedule_at(prune: KeptCounts | None, merge: KeptCounts | None, tokens: int, protected: int,
                tilt: float) -> tuple[list[int], list[int]]:
    """The hard schedule (prunes, merges) the rates give, every distribution tilted by `tilt`."""
    with torch.no_grad():
        kp = prune.expected(tilt).tolist() if prune is not None else None
        km = merge.expected(tilt).tolist() if merge is not None else None
    layers = len(kp if kp is not None else km)
    prunes, merges, n = [], [], tokens
    for i in range(layers):
        n_mid, n_out = layer_counts(n, int(kp[i]) if kp else None, int(km[i]) if km else None, protected, i)
        prunes.append(n - n_mid)
        merges.append(n_mid - n_out)
        n = n_out
    return prunes, merges


def fit_budget(prune, merge, tokens, protected, cost: TokenFlops, target: float) -> tuple[float, tuple[list[int], list[int]]]:
    """The tilt (and its schedule) whose FLOPs are the largest not above the target, by bisection (the fraction
    falls as the tilt grows)."""
    def fraction(t: float) -> float:
        return cost.fraction(hard_counts(*schedule_at(prune, merge, tokens, protected, t), tokens))

    lo, hi = -8.0, 8.0
    if fraction(hi) > target:
        most = fraction(hi)
        raise UsageError(f"learned_rates: keeping {target:.0%} of the FLOPs is out of reach; at least {most:.0%} "
                         f"remain with {tokens} tokens (enable prune, or raise the budget)")
    if fraction(lo) <= target:
        return lo, schedule_at(prune, merge, tokens, protected, lo)
    for _ in range(40):
        mid = (lo + hi) / 2
        if fraction(mid) <= target:
            hi = mid
        else:
            lo = mid
    return hi, schedule_at(prune, merge, tokens, protected, hi)


def check_schedule(handle, prunes: list[int], merges: list[int]) -> None:
    """The schedule must be one the static program accepts: non-negative, within each layer's caps."""
    from compressor.program.merging import max_merge
    from compressor.program.pruning import max_prune

    n, protected = handle.num_tokens, handle.adapter.protected_per_sample
    for i, (p, r) in enumerate(zip(prunes, merges)):
        if p < 0 or r < 0 or p > max_prune(n, protected) or r > max_merge(n - p, protected):
            raise RuntimeError(f"learned_rates produced an invalid schedule at layer {i}: prune {p}, merge {r} of {n}")
        n -= p + r
