"""An onnxruntime-genai build as a `compress bench` baseline row (`--genai DIR`), timed in the same interleaved loops.

DIR is the output folder of onnxruntime-genai's model builder (benchmarks/setup_genai.sh makes one in a separate venv:
the builder needs transformers 5): genai_config.json and the decoder graph it names. That graph follows our fused
decoders' convention (input_ids, attention_mask, past_key_values.{i}.key/.value in; logits, present.{i}.key/.value
out; GroupQueryAttention over past/present buffers genai shares), so the runtime's SharedKVDecoder runs it in an
onnxruntime session with the artifact's threads and providers: greedy, one preallocated KV buffer per layer. When the
`onnxruntime_genai` package is importable here, a second row times genai's own og.Generator on the same build.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compressor.errors import UsageError

CONFIG = "genai_config.json"
FIX = "pass the folder onnxruntime-genai's model builder wrote for this model (benchmarks/setup_genai.sh builds one)"


@dataclass
class GenaiBuild:
    folder: Path
    model_file: Path
    model_type: str
    vocab_size: int
    num_layers: int
    head_size: int
    min_kv_slots: int  # the sliding window (plus genai's slack): GroupQueryAttention wants at least that much room
    precision: str | None  # from genai_config when it says, else None (read from the graph by `name`)


def check_build(folder: str | Path, vocab_size: int | None = None) -> GenaiBuild:
    """The build at `folder`, or a UsageError naming what is wrong and the fix (one line). With `vocab_size` (the
    artifact's), the build must be of a model with that vocabulary."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"--genai '{folder}' does not exist or is not a folder; {FIX}")
    config_path = folder / CONFIG
    if not config_path.is_file():
        raise UsageError(f"--genai '{folder}' holds no {CONFIG}, so it is not an onnxruntime-genai build; {FIX}")
    try:
        config = json.loads(config_path.read_text())
        model = config["model"]
        decoder = model["decoder"]
        filename = str(decoder["filename"])
        layers, head, vocab = int(decoder["num_hidden_layers"]), int(decoder["head_size"]), int(model["vocab_size"])
    except (ValueError, KeyError, TypeError) as e:
        what = f"no {e}" if isinstance(e, KeyError) else (str(e).splitlines() or [type(e).__name__])[0]
        raise UsageError(f"--genai: {config_path} is not a usable genai config ({what}: it needs model.vocab_size and "
                         f"model.decoder.filename, num_hidden_layers and head_size); {FIX}") from None
    model_file = folder / filename
    if not model_file.is_file():
        raise UsageError(f"--genai '{folder}': {CONFIG} names the decoder '{filename}', which is not in the folder; "
                         f"copy the whole build folder, or rebuild it ({FIX})")
    if vocab_size is not None and vocab != int(vocab_size):
        raise UsageError(f"--genai '{folder}' is a build of a model with {vocab} vocabulary entries, the artifact's "
                         f"has {vocab_size}: not the same model; pass a genai build of the artifact's source model")
    window = decoder.get("sliding_window") or {}
    precision = model.get("precision") or decoder.get("precision")
    return GenaiBuild(folder, model_file, str(model.get("type") or "unknown"), vocab, layers, head,
                      int(window.get("window_size") or 0) + int(window.get("cache_slack") or 0),
                      str(precision).lower() if precision else None)


def vocab_of(manifest: dict) -> int | None:
    """The artifact's vocabulary size: from its preprocess record, else from its logits output."""
    if manifest["preprocess"].get("vocab_size"):
        return int(manifest["preprocess"]["vocab_size"])
    logits = next((o for o in manifest.get("outputs", []) if o["name"] == "logits"), None)
    last = logits["shape"][-1] if logits else None
    return int(last) if isinstance(last, int) else None


def _graph_precision(model_file: Path) -> str | None:
    """int4/int8 from the weight-only quantized MatMuls of the graph (genai's builder writes MatMulNBits), else the
    float type of its logits; None when the graph says neither."""
    import onnx

    graph = onnx.load(str(model_file), load_external_data=False).graph
    bits = {a.i for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"}
    if len(bits) == 1:
        return f"int{bits.pop()}"
    logits = next((o for o in graph.output if o.name == "logits"), None)
    floats = {onnx.TensorProto.FLOAT: "fp32", onnx.TensorProto.FLOAT16: "fp16", onnx.TensorProto.BFLOAT16: "bf16"}
    return floats.get(logits.type.tensor_type.elem_type) if logits is not None else None


def name(build: GenaiBuild) -> str:
    """The row's name: genai_<precision> (genai_config's, else the graph's), or genai."""
    precision = build.precision or _graph_precision(build.model_file)
    return f"genai_{precision}" if precision else "genai"


class GenaiDecoder:
    """The build's graph in an onnxruntime session (the artifact's threads and providers), run the way the runtime
    runs fused artifacts: SharedKVDecoder, greedy argmax per step."""

    def __init__(self, build: GenaiBuild, open_session):
        from compressor.runtime.decode import SharedKVDecoder

        self.build, self.session = build, open_session(build.model_file)
        self._decoder = SharedKVDecoder
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.kv_heads = []
        for i in range(build.num_layers):
            spec = inputs.get(f"past_key_values.{i}.key")
            if spec is None or spec.type != "tensor(float)" or not isinstance(spec.shape[1], int):
                found = "missing" if spec is None else f"{spec.type} {spec.shape}"
                raise UsageError(f"--genai '{build.folder}': its decoder's past_key_values.{i}.key is {found}, not "
                                 "float32 (batch, kv_heads, past, head_size); pass a CPU FP32-activation build "
                                 "(the model builder's -e cpu)")
            self.kv_heads.append(int(spec.shape[1]))
        if not {"input_ids", "attention_mask"} <= set(inputs):
            raise UsageError(f"--genai '{build.folder}': its decoder takes no input_ids/attention_mask; {FIX}")

    def _new(self, slots: int):
        return self._decoder(self.session, self.kv_heads, self.build.head_size, 1, max(slots, self.build.min_kv_slots))

    def prefill(self, ids: list[int]) -> np.ndarray:
        """Next-token logits after one prefill of all of ids (one graph call, as the artifact's logits())."""
        return self._new(len(ids)).prefill([ids], len(ids))[0]

    def stream(self, prompt: list[int], new_tokens: int) -> list[int]:
        """new_tokens greedy tokens after prompt (no end-of-sequence stop), as CausalLM.stream does."""
        decoder = self._new(len(prompt) + new_tokens)
        logits = decoder.prefill([prompt], max(len(prompt), 1))[0]
        out = []
        for n in range(new_tokens):
            out.append(int(np.argmax(logits)))
            if n + 1 < new_tokens:
                logits = decoder.step(np.array(out[-1:], np.int64))[0]
        return out


class GenaiGenerator:
    """onnxruntime-genai's own og.Generator on the build (as benchmarks/genai_worker.py runs it): greedy, the
    artifact's thread count through og.Config.overlay, CPU unless the sessions run on CUDA."""

    def __init__(self, build: GenaiBuild, threads: int, providers: list[str]):
        import onnxruntime_genai as og

        self.og, self.build = og, build
        config = og.Config(str(build.folder))
        config.clear_providers()  # CPU
        if "CUDAExecutionProvider" in providers:
            config.append_provider("cuda")
        options = {"intra_op_num_threads": int(threads), "inter_op_num_threads": 1}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
        self.model = og.Model(config)

    def _generator(self, total: int):
        params = self.og.GeneratorParams(self.model)
        length = max(total, self.build.min_kv_slots)  # genai sizes a sliding-window cache min(max_length, window)
        params.set_search_options(do_sample=False, num_beams=1, max_length=length, min_length=total)
        return self.og.Generator(self.model, params)

    def prefill(self, ids: list[int]) -> None:
        generator = self._generator(len(ids) + 1)
        generator.append_tokens(np.asarray(ids, np.int32))

    def stream(self, prompt: list[int], new_tokens: int) -> list[int]:
        """append_tokens(prompt) runs the model over the prompt; the first generate_next_token() picks from those
        logits, each later one runs one step first: new_tokens - 1 steps, as the SharedKVDecoder rows."""
        generator = self._generator(len(prompt) + new_tokens)
        generator.append_tokens(np.asarray(prompt, np.int32))
        for _ in range(new_tokens):
            generator.generate_next_token()
        return [int(t) for t in generator.get_sequence(0)[len(prompt):]]


def genai_rows(build: GenaiBuild, open_session, threads: int, providers: list[str]) -> tuple[dict, dict]:
    """({row name: (runner with .prefill(ids) and .stream(prompt, n), what the result records about the row)}, a
    record for the result: the build, its model type, and whether the og.Generator row ran or why not)."""
    row = name(build)
    about = {"kind": "onnxruntime-genai", "build": str(build.folder), "model_type": build.model_type}
    rows = {row: (GenaiDecoder(build, open_session), dict(about, runner="onnxruntime session + SharedKVDecoder"))}
    record = dict(about, rows=[row])
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError as e:
        record["generator_skipped"] = (f"onnxruntime_genai is not importable here ({e}); the og.Generator row needs "
                                       "`pip install onnxruntime-genai` in this environment")
    else:
        generator = f"{row} (genai generator)"
        rows[generator] = (GenaiGenerator(build, threads, providers), dict(about, runner="og.Generator"))
        record["rows"].append(generator)
    return rows, record
