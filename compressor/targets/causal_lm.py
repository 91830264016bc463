"""Causal language models: one dynamic-shape decoder graph with a KV cache (fused onnxruntime ops and 4-bit weights
by default), a stock transformers folder beside it, validated by perplexity and greedy tokens on held-out text."""

from __future__ import annotations

from pathlib import Path

from compressor.errors import UsageError
from compressor.targets.base import SingleGraphTarget, check_seq_len
from compressor.validation.lm import LMValidationConfig


class CausalLMTarget(SingleGraphTarget):
    modality = kind = "causal_lm"
    label, decoder = "a causal language model", True
    shapes = {"batch": 1, "seq_len": 128}  # the probe/capture shape; the graph keeps batch and lengths dynamic
    Validation = LMValidationConfig
    calibration_description = "token windows of the Wikipedia calibration articles (gensim test data, first 80%)"

    def calibration_inputs(self, handle, samples, length, seed, option, length_option):
        from compressor.sources.inputs import lm_calibration

        return lm_calibration(handle, samples, length, seed, option, length_option)

    def probe_feeds(self, handle, part="probe", source=None):
        """Seeded windows of the calibration articles at the probe shape, with the dummy past."""
        from compressor.program.decoder import prefill_inputs
        from compressor.sources.lm_data import calibration_windows

        ids = calibration_windows(handle.adapter.tokenizer_file, handle.shapes["batch"], handle.shapes["seq_len"], seed=0)
        return prefill_inputs(handle.adapter, ids)

    def check_recipe(self, passes, options) -> None:
        """A KV-cache policy lives in the fused graph (position_ids, attention probabilities): refuse it with the
        traced lowering, and a budget of slots the artifact's positions can never fill."""
        from compressor.lower.optimize import fused_decoder

        super().check_recipe(passes, options)
        for p in passes:
            if p.name != "kv_cache":
                continue
            if not fused_decoder(options):
                raise UsageError("pass 'kv_cache' needs the fused decoder lowering (GroupQueryAttention); remove "
                                 "[export] lowering = \"generic\" / fuse / quantize")
            budget = p.config.budget
            if isinstance(budget, int) and budget >= options.max_length:
                raise UsageError(f"pass 'kv_cache': budget {budget} slots is not below the artifact's context "
                                 f"([export] max_length = {options.max_length}); lower budget or raise max_length")

    def _check_shapes(self, merged: dict) -> dict:
        return check_seq_len(merged)

    def program(self, handle, dense: bool = False):
        """The decoder with its KV cache (a language model has no token plan: dense and compressed are the same)."""
        from compressor.program.decoder import DecoderProgram

        return DecoderProgram(handle.adapter)

    def example_inputs(self, handle) -> tuple:
        """The probe windows with a dummy past that follows the blocks' current key/value heads."""
        from compressor.program.decoder import prefill_inputs

        return prefill_inputs(handle.adapter, handle.probe_inputs[0])

    def export(self, handle, folder: Path, dense, cfg, options, data: dict, step):
        """The graph that ships is what is validated: perplexity on it; ONNX vs PyTorch on its FP32 graph."""
        from compressor.artifact.compile import write_transformers_folder
        from compressor.artifact.manifest import build_manifest
        from compressor.lower.decoder_deploy import deploy_fused_decoder, mark_fused
        from compressor.lower.fused_decoder import fused_refusal
        from compressor.lower.onnx import MODEL_FILE, lower_decoder_to_onnx
        from compressor.lower.optimize import deploy_graph, fused_decoder, keep_float_modules
        from compressor.program.capture import capture, graph_stats
        from compressor.runtime.lm import CausalLM
        from compressor.sources.source import load_source
        from compressor.validation.lm import validate_lm

        step("capturing the decoder")
        stats = graph_stats(capture(handle.program(), handle.example_inputs()))
        fused = fused_decoder(options)
        refusal = fused_refusal(handle.adapter) if fused else None
        if refusal and (options.lowering == "fused" or handle.kv_policy):
            raise UsageError(f"[export] lowering = \"fused\": {refusal}; use lowering = \"generic\"")
        fused = fused and refusal is None
        if fused:
            deployed, lowered = deploy_fused_decoder(handle, folder / MODEL_FILE, options, step)
        else:
            step("lowering the decoder to ONNX (traced)")
            lower_decoder_to_onnx(handle.program(), handle.adapter, folder / MODEL_FILE)
            deployed, lowered = deploy_graph(folder / MODEL_FILE, options, handle.adapter, step,
                                             keep_float=keep_float_modules(handle.adapter))
            if refusal:
                deployed["lowering"] = {"lowering": "generic", "why": refusal}
        if handle.adapter.transformers_loadable:
            write_transformers_folder(handle, folder, step)
        step("validating on held-out text")
        partial = build_manifest(handle, stats, stats, {}, None)
        if fused:
            mark_fused(partial, options)
        lm = CausalLM(folder, partial)
        before = CausalLM(folder, dict(partial, model_file=lowered.name)) if lowered else None
        reference, _ = load_source(handle.source.reload_spec)
        result = validate_lm(handle, lm, reference, cfg, before)
        if lowered:
            del before
            lowered.unlink(missing_ok=True)
            lowered.with_name(lowered.name + ".data").unlink(missing_ok=True)  # a graph over 1 GB keeps its weights beside it
        return stats, result, deployed

    def finish_manifest(self, manifest: dict, options) -> None:
        if manifest["export"].get("lowering", {}).get("lowering") == "fused":
            from compressor.lower.decoder_deploy import mark_fused

            mark_fused(manifest, options)

    def outputs(self, handle) -> list[dict]:
        from compressor.lower.onnx import decoder_io_names

        ad = handle.adapter
        outputs = [{"name": "logits", "shape": ["batch", "sequence", ad.config.vocab_size], "dtype": "float32"}]
        kv = [h for h in ad.kv_heads for _ in range(2)]
        outputs += [{"name": n, "shape": ["batch", kv[i], "total", ad.head_dim], "dtype": "float32"}
                    for i, n in enumerate(decoder_io_names(len(ad.layers))[1][1:])]
        if handle.kv_policy and handle.kv_policy["scores"]:  # h2o / snapkv read each layer's attention
            outputs += [{"name": f"attention_probs.{i}", "shape": ["batch", layer.heads, "sequence", "total"],
                         "dtype": "float32"} for i, layer in enumerate(ad.layers)]
        return outputs
