"""learned_rates: per-layer pruning and merging counts learned under a cost budget (DiffRate, ICCV 2023), made a
compiler step.

Every block gets a distribution over kept-token counts for pruning (class-attention ranking) and one for merging
(ToMe's bipartite matching); the model's weights stay frozen and only these distributions train, on calibration
inputs, to keep the output close to the dense model's (1 - cosine of the pooled outputs plus an MSE between
standardised final hidden states). Where DiffRate pulls the expected cost to the budget with a penalty
5 x (GFLOPs - target)^2, every step here is first projected onto the budget: all distributions are shifted by one
shared tilt until the schedule's cost is the largest not above the target, so each step compares allocations at the
budget's cost and the loss moves tokens between layers rather than above the budget (DiffRate's penalty is kept on
the soft counts but is nearly idle after the projection). The cost is FLOPs, or with a latency budget a per-block
latency table timed on this machine's onnxruntime (latency.py), checked on the compiled graph afterwards. The search
runs the model with masks instead of removal (search.py), so the counts get gradients. DiffRate starts from uniform
rates and searches for 3 ImageNet epochs; with a few hundred calibration inputs the search starts instead from the
best of token_merge's hand schedules at the budget. Its result is then refined by measured exchanges of tokens
between blocks at equal cost (exchange.py), and the start, the search's result and the exchanged schedule are scored
on calibration inputs neither the steps nor the exchanges saw; the best is kept (the record says which). The result
is a plain static schedule (`prunes`, `merges` per layer) stored in the token plan and in this pass's record,
compiled like token_merge's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from compressor.errors import UsageError
from compressor.pipeline.pass_base import Pass, PassResult, register
from compressor.program.encoder import TokenPlan
from compressor.program.token_cost import TokenFlops, hard_counts

from .calibration import calibration, calibration_split, distill_loss, pooled_score
from .exchange import TokenSchedule, exchange, valid
from .latency import LatencyTable, measured_ratio, retarget
from .rates import KeptCounts
from .schedules import DECAYS, centre, fit_budget, warm_start
from .search import search_forward

__all__ = ["DECAYS", "LearnedRates", "LearnedRatesConfig", "calibration_split"]

PENALTY = 5.0  # weight of (cost fraction - target)^2, as in DiffRate (there in GFLOPs)
WARMUP = 0.1  # fraction of the steps before the penalty applies


@dataclass
class LearnedRatesConfig:
    flops: float | None = field(default=None, metadata={"help": "keep this fraction of the dense FLOPs, in (0, 1), e.g. 0.5"})
    latency: float | None = field(default=None, metadata={"help": "keep this fraction of the dense model's onnxruntime latency at the compiled shapes, measured here (see latency.py); give flops or latency"})
    threads: int = field(default=2, metadata={"help": "onnxruntime threads when measuring a latency budget (as the deployment will run)"})
    prune: bool | None = field(default=None, metadata={"help": "learn pruning counts (class-attention ranking); default: on for models pooled from a class token"})
    merge: bool = field(default=True, metadata={"help": "learn merging counts (ToMe bipartite matching)"})
    steps: int = field(default=60, metadata={"help": "optimizer steps on the rates (weights stay frozen)"})
    batch: int = field(default=4, metadata={"help": "calibration inputs per step"})
    calibration_samples: int = field(default=240, metadata={"help": "calibration inputs the steps cycle through: text encoders, Wikipedia calibration paragraphs cut to random lengths; vision encoders, random crops of the built-in calibration photographs; or samples of [data] calibration when given (texts cut the same way)"})
    lr: float = field(default=0.1, metadata={"help": "Adam learning rate of the rate logits"})
    exchanges: int = field(default=60, metadata={"help": "trades between blocks tried after the gradient search (exchange.py), each scored on the compiled program; 0: none"})
    exchange_samples: int = field(default=128, metadata={"help": "calibration inputs the exchanges are scored on (outside the up to 64 held out for the final choice)"})
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
        if self.exchanges < 0 or self.exchange_samples < 1:
            raise ValueError("exchanges must be >= 0 and exchange_samples >= 1")
        if self.calibration_samples < 2:
            raise ValueError("calibration_samples must be >= 2 (some are held out to choose the final schedule)")
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
    runs_before = {"token_merge": "it sets the whole token schedule: use it instead of token_merge, not after it",
                   "token_prune": "it sets the whole token schedule: use it instead of token_prune, not after it"}

    def calibration_need(self, target):
        return "calibration_samples", self.config.calibration_samples

    def check(self, handle) -> None:
        super().check(handle)
        cfg: LearnedRatesConfig = self.config
        if cfg.prune and not handle.adapter.has_class_token:
            raise UsageError(f"learned_rates: prune = true needs a model pooled from a class token; this "
                             f"{handle.adapter.family} model pools otherwise (use prune = false: merging only)")
        if handle.plan.active:
            raise UsageError("learned_rates sets the whole token schedule: use it instead of token_merge/token_prune, "
                             "not after them")

    def run(self, handle, ctx) -> PassResult:
        cfg: LearnedRatesConfig = self.config
        ad = handle.adapter
        tokens, layers, protected = handle.num_tokens, handle.num_layers, ad.protected_per_sample
        use_prune = ad.has_class_token if cfg.prune is None else cfg.prune
        floor = protected + 2
        prune = KeptCounts(layers, tokens, floor, cfg.granularity) if use_prune else None
        merge = KeptCounts(layers, tokens, floor, cfg.granularity) if cfg.merge else None
        flops = cost = TokenFlops.of(handle)
        start = time.perf_counter()
        target, table = cfg.flops, None
        if cfg.latency is not None:  # the search spends measured milliseconds, not FLOPs
            cost = table = LatencyTable.measure(handle, ctx.latency, cfg.threads, floor, ctx.progress.track)
            target = cfg.latency
        inputs, teacher = calibration(handle, ctx.calibration, cfg)
        held, polish, first_step_row = calibration_split(cfg)
        ad.model.eval()
        ad.model.requires_grad_(False)
        on_held = pooled_score(ad, inputs, teacher[0], range(held), cfg.proportional_attention)
        on_polish = pooled_score(ad, inputs, teacher[0], range(held, held + polish), cfg.proportional_attention)
        hand = warm_start(prune, merge, on_polish, tokens, layers, protected, cost, target)
        start_logits = [m.logits.detach().clone() for m in (prune, merge) if m is not None]
        params = [m.logits for m in (prune, merge) if m is not None]
        opt = torch.optim.Adam(params, lr=cfg.lr)
        g = torch.Generator().manual_seed(cfg.seed)
        pool = cfg.calibration_samples - first_step_row
        epochs = -(-cfg.steps * cfg.batch // pool)
        order = first_step_row + torch.cat([torch.randperm(pool, generator=g) for _ in range(epochs)])
        trace = []
        for step in ctx.progress.track(range(cfg.steps), "learning rates (search steps)"):
            idx = order[step * cfg.batch:(step + 1) * cfg.batch]
            tilt, _ = fit_budget(prune, merge, tokens, protected, cost, target)  # every step on the budget
            pooled, stream, sched = search_forward(ad, tuple(t[idx] for t in inputs), prune, merge,
                                                   cfg.proportional_attention, tilt)
            fidelity = distill_loss(pooled, stream, teacher[0][idx], teacher[1][idx], cfg.hidden_weight)
            fraction = cost.fraction(sched.counts)
            loss = fidelity
            if step >= WARMUP * cfg.steps:
                loss = loss + PENALTY * (fraction - target) ** 2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            trace.append((fidelity.item(), fraction.item()))
        learned = TokenSchedule(*map(tuple, fit_budget(prune, merge, tokens, protected, cost, target)[1]))
        with torch.no_grad():
            for m, lg in zip([m for m in (prune, merge) if m is not None], start_logits):
                m.logits.copy_(lg)
        begun = TokenSchedule(*map(tuple, fit_budget(prune, merge, tokens, protected, cost, target)[1]))
        polished, trades = begun, []
        if cfg.exchanges:  # trades start from the better of the two on their own inputs
            name, origin, loss = min((("start", begun, on_polish(begun)), ("learned", learned, on_polish(learned))),
                                     key=lambda t: t[2])
            polished, trades = exchange(origin, loss, name, on_polish, cost, target, tokens, protected,
                                        learn_prune=use_prune, learn_merge=cfg.merge, step=4 * cfg.granularity,
                                        granularity=cfg.granularity, budget=cfg.exchanges)
        candidates = {"start": begun, "learned": learned, "exchanged": polished}
        losses = {name: on_held(sch) for name, sch in candidates.items()}
        kept = min(losses, key=lambda k: (losses[k], list(losses).index(k)))  # a tie goes to the earlier stage
        final = candidates[kept]
        search_seconds = time.perf_counter() - start
        chosen = {"kept": kept, "held_out_inputs": held, "exchange_inputs": polish, "trades": trades,
                  **{f"loss_{k}": round(v, 6) for k, v in losses.items()}}
        centre(prune, merge, final, tokens)  # a latency re-target tilts from (about) the kept schedule
        attempts, (prunes, merges) = [], (list(final.prunes), list(final.merges))
        while True:
            fraction = flops.fraction(hard_counts(prunes, merges, tokens))
            if table is None:
                break
            handle.plan = plan_of(prunes, merges, use_prune, cfg)
            attempts.append({"target": round(target, 4), "predicted_ratio": round(table.fraction(hard_counts(prunes, merges, tokens)), 4),
                             "flops_fraction": round(fraction, 4), "prunes": prunes, "merges": merges,
                             **measured_ratio(handle, ctx.latency, cfg.threads)})
            again = retarget(attempts, cfg.latency, ctx.latency.tolerance, ctx.latency.attempts)  # missed by more than the tolerance: tilt the rates again
            if again is None:
                break
            try:
                _, (prunes, merges) = fit_budget(prune, merge, tokens, protected, cost, again)
            except UsageError:
                break  # a re-drawn target out of reach: keep the attempts so far
            target = again
        if attempts:  # the attempt that measured closest to the budget (a noisy timing must not win by being last)
            best = min(attempts, key=lambda a: abs(a["measured_ratio"] - cfg.latency))
            prunes, merges, target, fraction = best["prunes"], best["merges"], best["target"], best["flops_fraction"]
        handle.plan = plan_of(prunes, merges, use_prune, cfg)
        check_schedule(handle, prunes, merges)
        head = max(1, len(trace) // 10)
        latency = None
        if table is not None:
            latency = {"keep": cfg.latency, "table": table.record(), **best, "attempts": attempts}
        return PassResult(modified=handle.plan.active, info={
            "latency": latency,
            "prunes": prunes if use_prune else [],
            "merges": merges,
            "schedule": merges,
            "token_counts": handle.plan.token_counts(tokens, layers),
            "prune_by": "cls_attention" if use_prune else None,
            "cost": "latency table" if table is not None else "flops",
            "target": target,  # the fraction of the cost kept (last corrected target, for latency)
            "flops_fraction": round(fraction, 4),
            "flops_fraction_learned": round(flops.fraction(hard_counts(list(learned.prunes), list(learned.merges), tokens)), 4),
            "start": hand,
            "chosen": chosen,
            "loss_first": sum(t[0] for t in trace[:head]) / head,
            "loss_last": sum(t[0] for t in trace[-head:]) / head,
            "steps": cfg.steps,
            "calibration": ctx.calibration.description(),
            "search_seconds": round(search_seconds, 1),
            "device": f"cpu ({torch.get_num_threads()} threads)",
        })


def plan_of(prunes: list[int], merges: list[int], use_prune: bool, cfg: LearnedRatesConfig) -> TokenPlan:
    return TokenPlan(merges=merges, prunes=prunes if use_prune else [], proportional_attention=cfg.proportional_attention)


def check_schedule(handle, prunes: list[int], merges: list[int]) -> None:
    """The schedule must be one the static program accepts (exchange.valid: non-negative, within each layer's caps)."""
    if not valid(TokenSchedule(tuple(prunes), tuple(merges)), handle.num_tokens, handle.adapter.protected_per_sample):
        raise RuntimeError(f"learned_rates produced an invalid schedule: prunes {prunes}, merges {merges} of {handle.num_tokens} tokens")
