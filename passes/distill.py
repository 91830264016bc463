"""distill: a bounded recovery step for compressed models (knowledge distillation, off unless asked for).

The student is the model as earlier passes left it (any SliceGPT mode: the shortcut matrices train too; for encoders
the program with its token plan, so a token-merged model learns as it will run); the teacher is the original model
reloaded from the source. Full fine-tuning keeps the architecture: a portable SliceGPT model stays a stock
transformers model.

Language models: the token-level KL divergence from the teacher's next-token distribution to the student's, on
windows drawn from the calibration articles only (never the held-out text that validation and the benchmarks read),
so the student learns to imitate the teacher, not the text.

Encoders: 1 - cosine between the pooled outputs plus an MSE between per-token standardised final hidden states, on
calibration inputs only: Wikipedia paragraphs cut to random lengths (validation reads held-out articles, benchmarks
the Lee documents) or random crops of the built-in calibration photographs (validation reads other photographs).
A recipe's `[data] calibration` (a text file, a folder of images) replaces them, as for every calibrating pass
(`compressor.sources.inputs.calibration_inputs`); language models then cut their windows from that text. The loss and
cosine are reported before and after on further calibration inputs never trained on; if training made the loss there
worse, the weights found are put back (`restored`). Defaults on 2 idle CPU cores, after token merging at r = 16:
MiniLM at 128 tokens 20 s (held-out Lee documents' cosine to dense 0.933 -> 0.942, Lee sentences 0.9976 -> 0.9973);
DINOv2-S at 224 x 224 64 s (nearly lossless already, 0.9989 on held-out images: training only added noise, so the
weights were restored; with half the MLP channels of every block removed it recovers 0.44 -> 0.87).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from compressor.pipeline.progress import track
from compressor.errors import UsageError
from compressor.models import PAD
from compressor.pipeline.pass_base import Pass, PassResult, register
from compressor.program.encoder import Encoded

LM_ONLY = ("seq_len", "temperature", "eval_windows")
ENCODER_ONLY = ("samples", "eval_samples", "hidden_weight")
LM_LR, ENCODER_LR = 1e-4, 1e-5
MIN_TOKENS = 8  # shortest calibration input for text encoders, [CLS] and [SEP] included


@dataclass
class DistillConfig:
    steps: int = field(default=100, metadata={"help": "optimizer steps (each reads batch x seq_len calibration tokens, or batch encoder inputs: 100 x 2 take about 20 s for MiniLM at 128 tokens, 1 minute for DINOv2-S at 224 on 2 CPU cores)"})
    batch: int = field(default=2, metadata={"help": "windows (language models) or inputs (encoders) per step"})
    seq_len: int = field(default=256, metadata={"help": "tokens per window (language models; encoders read the compiled length)"})
    lr: float | None = field(default=None, metadata={"help": "peak AdamW learning rate (linear warm-up, cosine decay to 10%); default 1e-4 for language models, 1e-5 for encoders"})
    warmup: float = field(default=0.1, metadata={"help": "fraction of the steps spent warming up"})
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature of teacher and student (language models)"})
    train: str = field(default="all", metadata={"help": "all: every weight; blocks: the transformer blocks only (embeddings and head frozen)"})
    max_seconds: float = field(default=0.0, metadata={"help": "stop early after this much wall time (0: no limit)"})
    seed: int = field(default=1234, metadata={"help": "seed for the training windows, or for the encoder's calibration inputs and their order (differs from slicegpt's calibration seed)"})
    eval_windows: int = field(default=4, metadata={"help": "calibration windows (another seed) on which KL is reported before and after (language models)"})
    device: str = field(default="auto", metadata={"help": "where to train: cpu, cuda, or auto (cuda when available); the model returns to the CPU after; encoders train on the CPU"})
    samples: int = field(default=256, metadata={"help": "encoders: calibration inputs the steps cycle through (drawn with seed: Wikipedia paragraphs, crops of the built-in calibration photographs, or the recipe's [data] calibration)"})
    eval_samples: int = field(default=32, metadata={"help": "encoders: further calibration inputs, never trained on, on which loss and cosine to the teacher are reported before and after"})
    hidden_weight: float = field(default=1.0, metadata={"help": "encoders: weight of the MSE between per-token standardised final hidden states (real tokens; a token-merged student's against the teacher's merged the same way) beside 1 - cosine of the pooled outputs; 0: pooled only"})

    def __post_init__(self):
        if self.steps < 1 or self.batch < 1 or self.seq_len < 8 or self.eval_windows < 1:
            raise ValueError("steps, batch and eval_windows must be >= 1 and seq_len >= 8")
        if self.samples < 1 or self.eval_samples < 1 or self.hidden_weight < 0:
            raise ValueError("samples and eval_samples must be >= 1 and hidden_weight >= 0")
        bad_lr = self.lr is not None and not 0 < self.lr < 1
        if bad_lr or not 0 <= self.warmup < 1 or self.temperature <= 0 or self.max_seconds < 0:
            raise ValueError("lr must lie in (0, 1), warmup in [0, 1), temperature > 0, max_seconds >= 0")
        if self.train not in ("all", "blocks"):
            raise ValueError(f"train must be 'all' or 'blocks', got {self.train!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")


def optimizer_step(opt, params, loss: torch.Tensor) -> float:
    """One step on the loss with gradients clipped to norm 1; returns the loss."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return float(loss.detach())


def kl_per_token(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student), in nats, scaled by T^2 as in Hinton et al."""
    t = temperature
    s = F.log_softmax(student_logits.float() / t, dim=-1).flatten(0, -2)
    p = F.log_softmax(teacher_logits.float() / t, dim=-1).flatten(0, -2)
    return F.kl_div(s, p, log_target=True, reduction="batchmean") * t * t


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


def peak_lr(cfg: DistillConfig, modality: str) -> float:
    """Encoders take 10x less than language models: Adam's sign-like updates move every weight of a fan-in together,
    and at a few inputs a step that costs an encoder more than it recovers. Measured on held-out calibration inputs:
    MiniLM at r = 16, full-length paragraphs, cosine 0.926 -> 0.935 at 1e-4, 0.939 at 3e-5, 0.942 at 1e-5, 0.937 at
    3e-6 (8 inputs a step at 3e-5: 0.942, 4x the time); DINOv2 at 112 x 112 with half the MLP channels of four
    blocks removed 0.913 -> 0.958 / 0.960 / 0.947 at 1e-5 / 3e-6 / 1e-6, merged at r = 12 0.467 -> 0.881 / 0.832 /
    0.770."""
    if cfg.lr is not None:
        return cfg.lr
    return LM_LR if modality == "causal_lm" else ENCODER_LR


def learning_rate(step: int, cfg: DistillConfig, peak: float) -> float:
    warm = max(1, int(cfg.warmup * cfg.steps))
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, cfg.steps - warm)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def training_device(choice: str) -> torch.device:
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise UsageError("distill: device = 'cuda' but torch sees no CUDA device (use device = 'cpu' or 'auto')")
    return torch.device(choice)


@register
class Distill(Pass):
    name = "distill"
    summary = "bounded recovery: distil the compressed model towards the original on calibration text or images"
    Config = DistillConfig
    requires = frozenset()
    ensures = frozenset({"distilled"})

    def check(self, handle) -> None:
        """Options of the other kind of model are refused when changed from their defaults, so a recipe never
        carries a setting that did nothing."""
        super().check(handle)
        cfg, defaults = self.config, DistillConfig()
        lm = handle.adapter.modality == "causal_lm"
        other = [n for n in (ENCODER_ONLY if lm else LM_ONLY) if getattr(cfg, n) != getattr(defaults, n)]
        if other:
            kind = "encoders" if lm else "language models"
            raise UsageError(f"distill option(s) {', '.join(other)} apply to {kind} only, "
                             f"not this {handle.adapter.family} model")
        if not lm and cfg.device == "cuda":
            raise UsageError("distill trains encoders on the CPU (their program builds its constants there): "
                             "use device = 'cpu' or 'auto'")

    def run(self, handle) -> PassResult:
        if handle.adapter.modality != "causal_lm":
            return self._run_encoder(handle)
        from compressor.program.decoder import prefill_inputs
        from compressor.sources.inputs import calibration_description, calibration_inputs
        from compressor.sources.source import load_source

        cfg: DistillConfig = self.config
        ad = handle.adapter
        device = training_device(cfg.device)
        teacher, _ = load_source(handle.source.reload_spec)
        teacher.model.requires_grad_(False).to(device)
        ad.model.to(device)
        try:  # the model returns to the CPU, in eval mode and frozen, whatever happens
            student = handle.program()

            def student_logits(ids):
                return student(*prefill_inputs(ad, ids))[0]

            (eval_ids,) = calibration_inputs(handle, cfg.eval_windows, cfg.seq_len, cfg.seed + 1, "eval_windows", "seq_len")
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
            lr = peak_lr(cfg, ad.modality)
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
            (windows,) = calibration_inputs(handle, cfg.steps * cfg.batch, cfg.seq_len, cfg.seed, "steps x batch", "seq_len")
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
            "calibration": calibration_description(handle),
        })

    def _run_encoder(self, handle) -> PassResult:
        from compressor.program.encoder import EncoderProgram
        from compressor.sources.inputs import calibration_description, calibration_inputs
        from compressor.sources.source import load_source

        cfg: DistillConfig = self.config
        ad = handle.adapter
        total = cfg.samples + cfg.eval_samples
        try:  # one draw, split: the held-out inputs never overlap the training ones
            inputs = calibration_inputs(handle, total, seed=cfg.seed, option="samples + eval_samples")
        except UsageError as e:
            raise UsageError(f"distill: {e}") from None
        g = torch.Generator().manual_seed(cfg.seed)
        if ad.modality == "text":
            inputs = random_lengths(ad, inputs, g)
        train = tuple(t[:cfg.samples] for t in inputs)
        held = tuple(t[cfg.samples:] for t in inputs)
        teacher_ad, _ = load_source(handle.source.reload_spec)
        teacher_ad.prepare(handle.shapes)
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
            lr = peak_lr(cfg, ad.modality)
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True)  # fused: 10x faster step on the CPU
            epochs = -(-cfg.steps * cfg.batch // cfg.samples)
            order = torch.cat([torch.randperm(cfg.samples, generator=g) for _ in range(epochs)])
            losses, start, done = [], time.perf_counter(), 0
            for step in track(range(cfg.steps), "distilling (steps)"):
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
            "calibration": calibration_description(handle),
        })
