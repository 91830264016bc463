"""distill_lm: a bounded recovery step for compressed language models (knowledge distillation, off unless asked for).

The student is the model as earlier passes left it (any SliceGPT mode: the shortcut matrices train too); the teacher
is the original model reloaded from the source (`ctx.reference()`). The loss is the token-level KL divergence from the
teacher's next-token distribution to the student's, on windows drawn from the calibration articles only (never the
held-out text that validation and the benchmarks read), so the student learns to imitate the teacher, not the text.
A recipe's `[data] calibration` (a text file) replaces them: the windows are cut from that text. Full fine-tuning keeps
the architecture: a portable SliceGPT model stays a stock transformers model. The KL is reported before and after on
calibration windows drawn with another seed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from compressor.pipeline.pass_base import Pass, PassResult, register

from .common import check_training, learning_rate, optimizer_step, peak_lr, training_device

LM_LR = 1e-4  # peak learning rate unless `lr` is given (encoders take 10x less: common.peak_lr)
LR_MESSAGE = "lr must lie in (0, 1), warmup in [0, 1), temperature > 0, max_seconds >= 0"


@dataclass
class LMDistillConfig:
    steps: int = field(default=100, metadata={"help": "optimizer steps, each reading batch x seq_len calibration tokens"})
    batch: int = field(default=2, metadata={"help": "calibration windows per step"})
    seq_len: int = field(default=256, metadata={"help": "tokens per window"})
    lr: float | None = field(default=None, metadata={"help": "peak AdamW learning rate (linear warm-up, cosine decay to 10%); default 1e-4"})
    warmup: float = field(default=0.1, metadata={"help": "fraction of the steps spent warming up"})
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature of teacher and student"})
    train: str = field(default="all", metadata={"help": "all: every weight; blocks: the transformer blocks only (embeddings and head frozen)"})
    max_seconds: float = field(default=0.0, metadata={"help": "stop early after this much wall time (0: no limit)"})
    seed: int = field(default=1234, metadata={"help": "seed for the training windows (differs from slicegpt's calibration seed)"})
    eval_windows: int = field(default=4, metadata={"help": "calibration windows (another seed) on which KL is reported before and after"})
    device: str = field(default="auto", metadata={"help": "where to train: cpu, cuda, or auto (cuda when available); the model returns to the CPU after"})

    def __post_init__(self):
        check_counts(self)
        check_training(self, LR_MESSAGE, self.temperature)


def check_counts(cfg) -> None:
    if cfg.steps < 1 or cfg.batch < 1 or cfg.seq_len < 8 or cfg.eval_windows < 1:
        raise ValueError("steps, batch and eval_windows must be >= 1 and seq_len >= 8")


def kl_per_token(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student), in nats, scaled by T^2 as in Hinton et al."""
    t = temperature
    s = F.log_softmax(student_logits.float() / t, dim=-1).flatten(0, -2)
    p = F.log_softmax(teacher_logits.float() / t, dim=-1).flatten(0, -2)
    return F.kl_div(s, p, log_target=True, reduction="batchmean") * t * t


@register
class DistillLM(Pass):
    name = "distill_lm"
    summary = "bounded recovery of a language model: KL to the original's next-token distribution on calibration windows"
    Config = LMDistillConfig
    requires = frozenset({"decoder"})
    ensures = frozenset({"frozen"})

    def calibration_need(self, target):
        return "steps x batch", self.config.steps * self.config.batch

    def run(self, handle, ctx) -> PassResult:
        from compressor.program.decoder import prefill_inputs

        cfg: LMDistillConfig = self.config
        ad = handle.adapter
        device = training_device(cfg.device)
        teacher = ctx.reference().adapter
        teacher.model.requires_grad_(False).to(device)
        ad.model.to(device)
        try:  # the model returns to the CPU, in eval mode and frozen, whatever happens
            student = handle.program()

            def student_logits(ids):
                return student(*prefill_inputs(ad, ids))[0]

            (eval_ids,) = ctx.calibration.inputs(cfg.eval_windows, cfg.seq_len, cfg.seed + 1, "eval_windows", "seq_len")
            eval_ids = eval_ids.to(device)
            with torch.no_grad():
                eval_teacher = teacher.reference_logits(eval_ids)

            def eval_kl() -> float:
                with torch.no_grad():
                    return float(kl_per_token(student_logits(eval_ids), eval_teacher))

            kl_before = eval_kl()
            params = [p for n, p in ad.model.named_parameters() if cfg.train == "all" or ".layers." in n]
            for p in ad.model.parameters():
                p.requires_grad_(False)
            for p in params:
                p.requires_grad_(True)
            lr = peak_lr(cfg, LM_LR)
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
            (windows,) = ctx.calibration.inputs(cfg.steps * cfg.batch, cfg.seq_len, cfg.seed, "steps x batch", "seq_len")
            losses, start, done = [], time.perf_counter(), 0
            ad.model.train()
            for step, ids in enumerate(torch.split(windows.to(device), cfg.batch)):
                for group in opt.param_groups:
                    group["lr"] = learning_rate(step, cfg, lr)
                with torch.no_grad():
                    target = teacher.reference_logits(ids)
                loss = kl_per_token(student_logits(ids), target, cfg.temperature)
                losses.append(optimizer_step(opt, params, loss))
                done = step + 1
                if cfg.max_seconds and time.perf_counter() - start > cfg.max_seconds:
                    break
            seconds = time.perf_counter() - start
            ad.model.eval()
            kl_after = eval_kl()
        finally:
            ad.model.eval()
            ad.model.requires_grad_(False)
            ad.model.to("cpu")
        del teacher
        head = max(1, len(losses) // 10)
        return PassResult(modified=True, info={
            "steps": done,
            "tokens": done * cfg.batch * cfg.seq_len,
            "seconds": round(seconds, 1),
            "seconds_per_step": round(seconds / max(1, done), 2),
            "device": str(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
            "trained_params": sum(p.numel() for p in params),
            "loss_first": sum(losses[:head]) / head,
            "loss_last": sum(losses[-head:]) / head,
            "eval_kl_before": kl_before,
            "eval_kl_after": kl_after,
            "calibration": ctx.calibration.description(),
        })
