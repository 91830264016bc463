"""distill: bounded recovery by knowledge distillation, one name for two passes chosen by the model's kind.

`distill_lm` (lm.py: KL to the original's next-token distribution) trains language models; `distill_encoder`
(encoder.py: pooled cosine and standardised hidden states) trains text and image encoders. Each has only its own
options. `distill` is what recipes have always named: it takes the options of either (checked as either pass checks
them when the recipe is read, before the model's kind is known) and, once the model is known, becomes the pass of its
kind; an option of the other kind changed from its default is refused in one line, so a recipe never carries a
setting that did nothing. Its record keeps the name `distill` and all its options, as before the split.
"""

from __future__ import annotations

import dataclasses
import typing

from compressor.errors import UsageError
from compressor.pipeline.pass_base import Pass, PassResult, register

from . import encoder as _encoder
from . import lm as _lm
from .common import learning_rate, optimizer_step, peak_lr, training_device
from .encoder import DistillEncoder, EncoderDistillConfig, encode, encoder_loss, random_lengths, split_inputs
from .lm import DistillLM, LMDistillConfig, kl_per_token

__all__ = ["Distill", "DistillConfig", "DistillEncoder", "DistillLM", "EncoderDistillConfig", "LMDistillConfig", "encode",
           "encoder_loss", "kl_per_token", "learning_rate", "optimizer_step", "peak_lr", "random_lengths",
           "split_inputs", "training_device"]

KINDS = {True: DistillLM, False: DistillEncoder}  # target.decoder -> the pass


def _union_config() -> type:
    """Every option of either pass, language models' first (the order `distill` has always listed them), each with
    its kind named where it applies to one kind only or means something else for each."""
    lm_hints, enc_hints = typing.get_type_hints(LMDistillConfig), typing.get_type_hints(EncoderDistillConfig)
    lm = {f.name: f for f in dataclasses.fields(LMDistillConfig)}
    enc = {f.name: f for f in dataclasses.fields(EncoderDistillConfig)}
    rows = []
    for name in [*lm, *(n for n in enc if n not in lm)]:
        a, b = lm.get(name), enc.get(name)
        if a is not None and b is not None:
            assert a.default == b.default, name  # one default, whichever pass it becomes
            ha, hb = a.metadata["help"], b.metadata["help"]
            text = ha if ha == hb else f"language models: {ha}; encoders: {hb}"
        else:
            text = f"language models: {a.metadata['help']}" if a is not None else f"encoders: {b.metadata['help']}"
        f = a or b
        rows.append((name, (lm_hints if a is not None else enc_hints)[name],
                     dataclasses.field(default=f.default, metadata={"help": text})))

    def __post_init__(self):  # the checks of both passes, in the order distill has always made them
        _lm.check_counts(self)
        _encoder.check_counts(self)
        _lm.check_training(self, _lm.LR_MESSAGE, self.temperature)

    return dataclasses.make_dataclass("DistillConfig", rows, namespace={"__post_init__": __post_init__,
                                                                        "__module__": __name__})


DistillConfig = _union_config()


@register
class Distill(Pass):
    name = "distill"
    summary = ("bounded recovery: distill_lm for a language model, distill_encoder for a text or image encoder, "
               "chosen by the model; takes either's options")
    Config = DistillConfig
    requires = frozenset()
    ensures = frozenset({"frozen"})  # what both passes ensure

    def of_kind(self, decoder: bool) -> Pass:
        """The pass of this kind, with this pass's values of its options (the other kind's dropped)."""
        cls = KINDS[decoder]
        return cls(config=cls.Config(**{f.name: getattr(self.config, f.name) for f in dataclasses.fields(cls.Config)}))

    def resolve(self, handle) -> Pass:
        """The pass this one becomes for `handle`; options of the other kind changed from their defaults are refused."""
        lm = handle.target.decoder
        own = {f.name for f in dataclasses.fields(KINDS[lm].Config)}
        defaults = DistillConfig()
        other = [f.name for f in dataclasses.fields(DistillConfig)
                 if f.name not in own and getattr(self.config, f.name) != getattr(defaults, f.name)]
        if other:
            kind = "encoders" if lm else "language models"
            raise UsageError(f"distill option(s) {', '.join(other)} apply to {kind} only, "
                             f"not this {handle.adapter.family} model")
        return self.of_kind(lm)

    def calibration_need(self, target):
        return self.of_kind(target.decoder).calibration_need(target)

    def check(self, handle) -> None:
        self.resolve(handle).check(handle)

    def run(self, handle, ctx) -> PassResult:
        return self.resolve(handle).run(handle, ctx)
