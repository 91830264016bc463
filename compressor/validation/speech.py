"""Speech validation: the artifact transcribes synthesised speech in onnxruntime, against our PyTorch programs.

Merging may flip a near-tie, so both gates are statistical: the artifact's WER may exceed the dense WER by at most
`max_wer_increase`, and its token ids must equal the compressed PyTorch program's on at least `min_export_agreement`
of the clips.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from compressor.errors import UsageError
from compressor.program.encoder import TokenPlan
from compressor.validation.bars import at_least, at_most


@dataclass
class SpeechValidation:
    clips: int = 4
    max_wer_increase: float = 0.10  # absolute, compressed vs dense, on the same clips
    min_export_agreement: float = 0.5  # clips whose onnxruntime token ids equal PyTorch's (near-ties may flip)
    max_new_tokens: int = 64

    def __post_init__(self):
        if self.clips < 1 or self.max_new_tokens < 1:
            raise UsageError(f"[validation] clips and max_new_tokens must be at least 1, got {self.clips} and {self.max_new_tokens}")
        if not 0.0 <= self.min_export_agreement <= 1.0 or self.max_wer_increase < 0.0:
            raise UsageError("[validation] min_export_agreement must lie in [0, 1] and max_wer_increase be >= 0")


def validate_speech(compressed, adapter, plan: TokenPlan, cfg: SpeechValidation, clips) -> dict:
    """Transcribe `clips` with the artifact (onnxruntime) and with our PyTorch programs, dense and compressed.

    Export agreement: the artifact's token ids against the same compressed program in PyTorch (merging may flip a
    near-tie, so it is a rate with a floor). Quality: WER of the artifact and of the dense model against the reference
    texts, and of the artifact against the dense transcripts.
    """
    from compressor.program.speech import greedy_transcribe
    from compressor.sources.speech import word_error_rate

    refs = [text for text, _ in clips]
    onnx_ids, torch_ids, dense_ids = [], [], []
    for _, wave in clips:
        onnx_ids.append(compressed.transcribe_ids(wave, cfg.max_new_tokens))
        features = torch.from_numpy(compressed.features(wave))
        torch_ids.append(greedy_transcribe(adapter, plan, features, compressed.prefix, cfg.max_new_tokens))
        dense_ids.append(onnx_ids[-1] if not plan.active else
                         greedy_transcribe(adapter, None, features, compressed.prefix, cfg.max_new_tokens))
    decode = lambda ids: compressed.tokenizer.decode(ids, skip_special_tokens=True).strip()  # noqa: E731
    dense_text, comp_text = [decode(i) for i in dense_ids], [decode(i) for i in onnx_ids]
    agreement = sum(a == b for a, b in zip(onnx_ids, torch_ids)) / len(clips)
    out = {"clips": len(clips), "wer_dense": word_error_rate(refs, dense_text), "wer_compressed": word_error_rate(refs, comp_text),
           "wer_compressed_vs_dense": word_error_rate(dense_text, comp_text),
           "identical_to_dense": sum(a == b for a, b in zip(dense_ids, onnx_ids)), "export_agreement": agreement,
           "transcripts": comp_text, "failures": []}
    if agreement < cfg.min_export_agreement:
        out["failures"].append(f"onnxruntime transcripts match PyTorch on {agreement:.0%} of clips (need {cfg.min_export_agreement:.0%})")
    if out["wer_compressed"] - out["wer_dense"] > cfg.max_wer_increase:
        out["failures"].append(f"WER rose from {out['wer_dense']:.3f} to {out['wer_compressed']:.3f} "
                               f"(allowed +{cfg.max_wer_increase:.3f})")
    out["passed"] = not out["failures"]
    out["config"] = asdict(cfg)
    return out


def speech_relax(result: dict) -> dict:
    """Bars a speech validation's measured values meet (validate_speech reports values and config, not keys)."""
    cfg, relax = result.get("config") or {}, {}
    if "export_agreement" in result and result["export_agreement"] < cfg.get("min_export_agreement", 0.0):
        relax["min_export_agreement"] = at_least(result["export_agreement"])
    if "wer_compressed" in result:
        rise = result["wer_compressed"] - result["wer_dense"]
        if rise > cfg.get("max_wer_increase", float("inf")):
            relax["max_wer_increase"] = at_most(rise)
    return relax
