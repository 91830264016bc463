"""One target object per kind of model: text encoder, image encoder, causal language model, speech seq2seq.

`target_for(modality)` is the one place a modality string becomes behaviour; every stage after it asks the target.
"""

from __future__ import annotations

from compressor.targets.base import Target
from compressor.targets.causal_lm import CausalLMTarget
from compressor.targets.encoders import ImageEncoderTarget, TextEncoderTarget
from compressor.targets.speech import SpeechTarget

TARGETS: dict[str, Target] = {t.modality: t for t in (TextEncoderTarget(), ImageEncoderTarget(), CausalLMTarget(), SpeechTarget())}


def target_for(modality: str) -> Target:
    try:
        return TARGETS[modality]
    except KeyError:
        raise ValueError(f"no target for modality {modality!r} (known: {sorted(TARGETS)})") from None


def target_of(manifest: dict) -> Target:
    """The target an artifact was built for, from its manifest's pre-processing kind (no model loaded)."""
    kind = manifest["preprocess"]["kind"]
    for t in TARGETS.values():
        if t.kind == kind:
            return t
    raise ValueError(f"no target for artifact kind {kind!r}")


def validation_keys() -> set[str]:
    """Every key a [validation] table may hold, over all kinds (checked per kind once the model is known)."""
    return set(validation_key_types())


def validation_key_types() -> dict[str, set[type]]:
    """Each [validation] key and the types it has over the kinds that take it (int: a count)."""
    from dataclasses import fields

    out: dict[str, set[type]] = {}
    for t in TARGETS.values():
        for f in fields(t.Validation):
            out.setdefault(f.name, set()).add(type(getattr(t.Validation, f.name)))
    return out


__all__ = ["TARGETS", "Target", "target_for", "target_of", "validation_keys"]
