"""distill_encoder: a bounded recovery step for compressed text and image encoders (knowledge distillation, off
unless asked for).

The student is the compiled program with its token plan, so a token-merged model learns as it will run; the teacher
is the original model reloaded from the source (`ctx.reference()`). The loss is 1 - cosine between the pooled outputs
plus an MSE between per-token standardised final hidden states, on calibration inputs only (`ctx.calibration`):
Wikipedia paragraphs cut to random lengths (validation reads held-out articles, benchmarks the Lee documents) or
random crops of the built-in calibration photographs (validation reads other photographs). A recipe's
`[data] calibration` (a text file, a folder of images) replaces them, as for every calibrating pass. The loss and
cosine are reported before and after on further calibration inputs never trained on; if training made the loss there
worse, the weights found are put back (`restored`). Defaults on 2 idle CPU cores, after token merging at r = 16:
MiniLM at 128 tokens 20 s (held-out Lee documents' cosine to dense 0.933 -> 0.942, Lee sentences 0.9976 -> 0.9973);
DINOv2-S at 224 x 224 64 s (nearly lossless already, 0.9989 on held-out images: training only added noise, so the
weights were restored; with half the MLP channels of every block removed it recovers 0.44 -> 0.87).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from compressor.errors import UsageError
from compressor.models import PAD
from compressor.pipeline.pass_base import Pass, PassResult, register
from compressor.program.encoder import Encoded

from .common import check_training, learning_rate, optimizer_step, peak_lr

ENCODER_LR = 1e-5  # peak learning rate unless `lr` is given (10x less than language models: common.peak_lr)
MIN_TOKENS = 8  # shortest calibration input for text encoders, [CLS] and [SEP] included
LR_MESSAGE = "lr must lie in (0, 1), warmup in [0, 1), max_seconds >= 0"


@dataclass
class EncoderDistillConfig:
    steps: int = field(default=100, metadata={"help": "optimizer steps, each reading batch calibration inputs (100 x 2 take about 20 s for MiniLM at 128 tokens, 1 minute for DINOv2-S at 224 on 2 CPU cores)"})
    batch: int = field(default=2, metadata={"help": "calibration inputs per step"})
    lr: float | None = field(default=None, metadata={"help": "peak AdamW learning rate (linear warm-up, cosine decay to 10%); default 1e-5"})
    warmup: float = field(default=0.1, metadata={"help": "fraction of the steps spent warming up"})
    train: str = field(default="all", metadata={"help": "all: every weight; blocks: the transformer blocks only (embeddings and head frozen)"})
    max_seconds: float = field(default=0.0, metadata={"help": "stop early after this much wall time (0: no limit)"})
    seed: int = field(default=1234, metadata={"help": "seed for the calibration inputs and their order"})
    device: str = field(default="auto", metadata={"help": "encoders train on the CPU (their program builds its constants there): auto or cpu"})
    samples: int = field(default=256, metadata={"help": "calibration inputs the steps cycle through (drawn with seed: Wikipedia paragraphs, crops of the built-in calibration photographs, or the recipe's [data] calibration)"})
    eval_samples: int = field(default=32, metadata={"help": "further calibration inputs, never trained on, on which loss and cosine to the teacher are reported before and after"})
    hidden_weight: float = field(default=1.0, metadata={"help": "weight of the MSE between per-token standardised final hidden states (real tokens; a token-merged student's against the teacher's merged the same way) beside 1 - cosine of the pooled outputs; 0: pooled only"})

    def __post_init__(self):
        check_counts(self)
        check_training(self, LR_MESSAGE)


def check_counts(cfg) -> None:
    if cfg.steps < 1 or cfg.batch < 1:
        raise ValueError("steps and batch must be >= 1")
    if cfg.samples < 1 or cfg.eval_samples < 1 or cfg.hidden_weight < 0:
        raise ValueError("samples and eval_samples must be >= 1 and hidden_weight >= 0")


def encode(program, inputs: tuple[torch.Tensor, ...]) -> Encoded:
    """The encoder program's forward with what the hidden-state loss needs (EncoderProgram.encode)."""
    return program.encode(*inputs, track_groups=True)


def encoder_loss(student: Encoded, teacher: Encoded, hidden_weight: float) -> torch.Tensor:
    """1 - cosine of the pooled outputs (mean over inputs), plus `hidden_weight` times the MSE between per-token
    standardised final hidden states over real tokens, each weighted by the input tokens it holds. Standardising
    makes the term scale-free (DINOv2's residual stream has a few huge channels; BERT's is already normalised) and
    puts it on the cosine's scale: for standardised vectors MSE = 2 (1 - cosine). A token-merged student is compared
    with the teacher's states averaged over the tokens each student token holds; a residual stream of another width
    (sliced) is compared through the pooled output only."""
    loss = 1.0 - F.cosine_similarity(student.pooled.float(), teacher.pooled.float(), dim=-1).mean()
    s, t = student.hidden.float(), teacher.hidden.float()
    if not hidden_weight or s.shape[-1] != t.shape[-1]:
        return loss
    if student.groups is not None:
        t = student.groups.float() @ t / student.size.float()
    c = s.shape[-1:]
    err = (F.layer_norm(s, c) - F.layer_norm(t, c)).pow(2).mean(dim=-1, keepdim=True)
    w = student.size.float() * (student.kinds != PAD)[..., None]
    return loss + hidden_weight * (err * w).sum() / w.sum().clamp(min=1.0)


def random_lengths(ad, inputs: tuple[torch.Tensor, ...], generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Cut each tokenized paragraph to a random length from MIN_TOKENS to its own, as the tokenizer truncates ([SEP]
    last, padding after). Paragraphs fill the compiled length, where merging must drop real tokens; short inputs lose
    only padding. Trained on full paragraphs alone, MiniLM (r = 16 at 128) gained on held-out paragraphs (cosine
    0.926 -> 0.942) and lost on the short validation sentences (0.9980 -> 0.9954)."""
    ids, mask = (t.clone() for t in inputs)
    for i, full in enumerate(mask.sum(dim=1).tolist()):
        k = int(torch.randint(min(MIN_TOKENS, full), full + 1, (1,), generator=generator))
        ids[i, k - 1], ids[i, k:], mask[i, k:] = ad.sep_id, ad.pad_id, 0
    return ids, mask


def split_inputs(inputs: tuple[torch.Tensor, ...], batch: int) -> list[tuple[torch.Tensor, ...]]:
    return [tuple(t[i:i + batch] for t in inputs) for i in range(0, inputs[0].shape[0], batch)]


@register
class DistillEncoder(Pass):
    name = "distill_encoder"
    summary = "bounded recovery of a text or image encoder: pooled cosine and hidden states to the original on calibration inputs"
    Config = EncoderDistillConfig
    requires = frozenset({"encoder"})
    ensures = frozenset({"frozen"})

    def calibration_need(self, target):
        return "samples + eval_samples", self.config.samples + self.config.eval_samples

    def check(self, handle) -> None:
        super().check(handle)
        if self.config.device == "cuda":
            raise UsageError("distill trains encoders on the CPU (their program builds its constants there): "
                             "use device = 'cpu' or 'auto'")

    def run(self, handle, ctx) -> PassResult:
        from compressor.program.encoder import EncoderProgram

        cfg: EncoderDistillConfig = self.config
        ad = handle.adapter
        total = cfg.samples + cfg.eval_samples
        try:  # one draw, split: the held-out inputs never overlap the training ones
            inputs = ctx.calibration.inputs(total, seed=cfg.seed, option="samples + eval_samples")
        except UsageError as e:
            raise UsageError(f"distill: {e}") from None
        g = torch.Generator().manual_seed(cfg.seed)
        if handle.target.text:
            inputs = random_lengths(ad, inputs, g)
        train = tuple(t[:cfg.samples] for t in inputs)
        held = tuple(t[cfg.samples:] for t in inputs)
        teacher_ad = ctx.reference().adapter  # loaded and prepared at the compiled shapes
        teacher_ad.model.requires_grad_(False)
        teacher = EncoderProgram(teacher_ad)
        chunk = max(cfg.batch, handle.shapes["batch"])
        try:  # the model ends in eval mode and frozen, whatever happens
            student = handle.program()
            with torch.no_grad():
                eval_targets = [encode(teacher, x) for x in split_inputs(held, chunk)]

            def evaluate() -> tuple[float, float, bool]:
                """Loss and mean pooled cosine to the teacher on the held-out inputs, and whether the hidden-state
                term applies (a sliced residual stream, SliceGPT on DINOv2, has another width)."""
                loss = cos = 0.0
                with torch.no_grad():
                    for x, t in zip(split_inputs(held, chunk), eval_targets):
                        s = encode(student, x)
                        loss += float(encoder_loss(s, t, cfg.hidden_weight)) * len(s.pooled)
                        cos += float(F.cosine_similarity(s.pooled.double(), t.pooled.double(), dim=-1).sum())
                return loss / cfg.eval_samples, cos / cfg.eval_samples, s.hidden.shape[-1] == t.hidden.shape[-1]

            ad.model.eval()  # also while training: no dropout, so the student fits the teacher's deterministic output
            loss_before, cos_before, hidden_matched = evaluate()
            blocks = {id(p) for p in ad.blocks.parameters()}
            params = [p for p in ad.model.parameters() if cfg.train == "all" or id(p) in blocks]
            ad.model.requires_grad_(False)
            for p in params:
                p.requires_grad_(True)
            saved = [p.detach().clone() for p in params]
            lr = peak_lr(cfg, ENCODER_LR)
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True)  # fused: 10x faster step on the CPU
            epochs = -(-cfg.steps * cfg.batch // cfg.samples)
            order = torch.cat([torch.randperm(cfg.samples, generator=g) for _ in range(epochs)])
            losses, start, done = [], time.perf_counter(), 0
            for step in ctx.progress.track(range(cfg.steps), "distilling (steps)"):
                idx = order[step * cfg.batch:(step + 1) * cfg.batch]
                x = tuple(t[idx] for t in train)
                for group in opt.param_groups:
                    group["lr"] = learning_rate(step, cfg, lr)
                with torch.no_grad():
                    target = encode(teacher, x)
                loss = encoder_loss(encode(student, x), target, cfg.hidden_weight)
                losses.append(optimizer_step(opt, params, loss))
                done = step + 1
                if cfg.max_seconds and time.perf_counter() - start > cfg.max_seconds:
                    break
            seconds = time.perf_counter() - start
            trained = sum(p.numel() for p in params if p.grad is not None)  # not the unused (BERT's pooler)
            for p in params:
                p.grad = None
            ad.model.requires_grad_(False)
            loss_after, cos_after, _ = evaluate()
            restored = loss_after >= loss_before
            if restored:  # never leave the model further from the teacher than it was found
                with torch.no_grad():
                    for p, q in zip(params, saved):
                        p.copy_(q)
        finally:
            ad.model.eval()
            ad.model.requires_grad_(False)
        del teacher, teacher_ad
        head = max(1, len(losses) // 10)
        return PassResult(modified=not restored, info={
            "steps": done,
            "inputs": done * cfg.batch,
            "seconds": round(seconds, 1),
            "seconds_per_step": round(seconds / max(1, done), 2),
            "device": f"cpu ({torch.get_num_threads()} threads)",
            "trained_params": trained,
            "loss_first": sum(losses[:head]) / head,
            "loss_last": sum(losses[-head:]) / head,
            "eval_loss_before": loss_before,
            "eval_loss_after": loss_after,
            "eval_cosine_before": cos_before,
            "eval_cosine_after": cos_after,
            "hidden_term": bool(cfg.hidden_weight) and hidden_matched,
            "lr": lr,
            "restored": restored,
            "calibration": ctx.calibration.description(),
        })
