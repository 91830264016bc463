"""Does a checkpoint fill the model its config describes? Checked at load, before any pass, so a wrong model is
refused in one line (naming the tensors, both shapes, or the truncation) instead of compiled with random weights."""

from __future__ import annotations

import json
from pathlib import Path

from compressor.errors import UsageError

# ---------------------------------------------------------------- what transformers could not fill

LISTED = 5  # tensors named in a refusal before "and N more"


def check_loading_info(model, info: dict, adapter_cls, weights: Path, spec: str) -> None:
    """Refuse a model whose weights transformers initialised or dropped, in one line naming the tensors and the fix.

    Tolerated, because the compiled model never reads them or transformers already accounts for them:
    - keys transformers itself leaves out of `missing_keys`: non-persistent buffers (position_ids, rotary inv_freq),
      the tied half of tied weights (lm_head.weight, Whisper's proj_out), its `_keys_to_ignore_on_load_*`;
    - a missing `pooler.*` (BERT, RoBERTa, MPNet, ViT ... saved without their tanh pooler, e.g. from a masked-LM or
      classification head): no adapter reads the pooler, and it is removed so its random weights are not published;
    - a missing `visual_projection.weight` for a `clip_vision_model` folder saved from CLIPVisionModel: the CLIP vision
      adapter drops the projection when the checkpoint has none;
    - unexpected keys outside every module of the loaded model (a task head such as `classifier.*`, `cls.*`,
      `vocab_projector.*` beside the base model that is compiled).
    """
    missing = list(info.get("missing_keys") or [])
    unexpected = list(info.get("unexpected_keys") or [])
    mismatched = list(info.get("mismatched_keys") or [])
    errors = [str(e) for e in info.get("error_msgs") or []]
    missing = [k for k in missing if not _optional_weight(k, adapter_cls)]
    children = {name for name, _ in model.named_children()} | {name for name, _ in model.named_parameters(recurse=False)}
    unexpected = [k for k in unexpected if k.split(".", 1)[0] in children]
    what = type(model).__name__
    if mismatched:
        raise UsageError(f"'{spec}': {_mismatch_message(model, mismatched, weights)}")
    if missing or unexpected:
        raise UsageError(f"'{spec}': {_keys_message(model, what, missing, unexpected)}")
    if errors:
        raise UsageError(f"'{spec}': transformers reported errors loading the weights into {what}: "
                         f"{_one_line(errors[0])}; fix the checkpoint or config.json")
    if getattr(model, "pooler", None) is not None and any(k.startswith("pooler.") for k in info.get("missing_keys") or []):
        model.pooler = None  # initialised randomly by transformers and never read: not published either


def _optional_weight(key: str, adapter_cls) -> bool:
    if key.startswith("pooler."):
        return True
    return key == "visual_projection.weight" and adapter_cls.auto_class == "CLIPVisionModelWithProjection"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _listed(names: list[str], limit: int = LISTED) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _block_lists(model) -> dict[str, int]:
    """Every ModuleList of blocks in the model (prefix -> length): where a layer count shows."""
    from torch import nn

    return {name: len(m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) and name}


def _config_keys_equal(model, value: int) -> list[str]:
    """The config entries (sub-configs included, as `text_config.x`) equal to `value`."""
    config = model.config.to_dict()
    found = []
    for key, v in config.items():
        if isinstance(v, dict):
            found += [f"{key}.{k}" for k, x in v.items() if type(x) is int and x == value]
        elif type(v) is int and v == value:
            found.append(key)
    return sorted(found)


def _layer_diagnosis(model, missing: list[str], unexpected: list[str]) -> tuple[str | None, set[str], set[str]]:
    """Whole blocks missing from or added to a ModuleList: (a sentence naming the config's count and the checkpoint's,
    the missing keys it explains, the unexpected keys it explains)."""
    import re

    lists = _block_lists(model)
    missing_set = set(missing)
    for prefix, length in sorted(lists.items(), key=lambda kv: -len(kv[0])):
        blocks = getattr_path(model, prefix)
        gone = []
        for i in range(length):
            keys = {f"{prefix}.{i}.{n}" for n, _ in blocks[i].named_parameters()}
            if keys and keys <= missing_set:
                gone.append(i)
        pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
        extra = sorted({int(m.group(1)) for k in unexpected if (m := pattern.match(k)) and int(m.group(1)) >= length})
        if not gone and not extra:
            continue
        words = [w for w in re.split(r"[._]", prefix) if w and not w.isdigit()]
        keys = [k for k in _config_keys_equal(model, length) if "layer" in k.lower()]
        keys.sort(key=lambda k: not any(w in k for w in words if w not in ("layer", "layers", "model")))
        named = f" ({keys[0]} = {length})" if keys else ""
        explained_missing = {k for k in missing if any(k.startswith(f"{prefix}.{i}.") for i in gone)}
        explained_unexpected = {k for k in unexpected if (m := pattern.match(k)) and int(m.group(1)) >= length}
        if extra:
            held = length + len(extra) if extra == list(range(length, length + len(extra))) else None
            more = f"{held}" if held else f"more ({prefix}.{', '.join(map(str, extra[:LISTED]))} beyond them)"
            fix = f"set {keys[0]} to {held} in config.json" if keys and held else "fix config.json"
            return (f"config.json says {length} layers{named} but the checkpoint holds {more} in {prefix}: "
                    f"{fix} or use the checkpoint that matches it", explained_missing, explained_unexpected)
        held = length - len(gone)
        if gone == list(range(held, length)):
            fix = f"set {keys[0]} to {held} in config.json" if keys else "fix config.json"
            lost = f"{prefix}.{gone[0]}" + (f"-{gone[-1]}" if len(gone) > 1 else "")
            return (f"config.json says {length} layers{named} but the checkpoint holds {held} in {prefix} "
                    f"(transformers would initialise {lost} randomly): {fix} or use the checkpoint that matches it",
                    explained_missing, explained_unexpected)
        return (f"the checkpoint lacks block(s) {', '.join(map(str, gone[:LISTED]))} of the {length} in {prefix} that "
                f"config.json{named} describes (transformers would initialise them randomly): use a complete "
                "checkpoint, or renumber the blocks and fix the count in config.json", explained_missing, explained_unexpected)
    return None, set(), set()


def getattr_path(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _keys_message(model, what: str, missing: list[str], unexpected: list[str]) -> str:
    parts = []
    layers, explained_missing, explained_unexpected = _layer_diagnosis(model, missing, unexpected)
    if layers:
        parts.append(layers)
    missing = [k for k in missing if k not in explained_missing]
    unexpected = [k for k in unexpected if k not in explained_unexpected]
    if missing and unexpected:
        parts.append(f"the checkpoint lacks {len(missing)} tensor(s) {what} needs ({_listed(missing)}) and holds "
                     f"{len(unexpected)} it has no place for ({_listed(unexpected)}): renamed tensors? give them the "
                     "names transformers expects, or use the config.json the checkpoint was saved with")
    elif missing:
        fix = "use a complete checkpoint, or the config.json it was saved with"
        if any(k.endswith("lm_head.weight") for k in missing) and not getattr(model.config, "tie_word_embeddings", True):
            fix += " (tie_word_embeddings is false: set it to true if the head shares the token embedding)"
        parts.append(f"the checkpoint lacks {len(missing)} tensor(s) {what} needs, which transformers would initialise "
                     f"randomly ({_listed(missing)}): {fix}")
    elif unexpected:
        parts.append(f"the checkpoint holds {len(unexpected)} tensor(s) {what} has no place for ({_listed(unexpected)}): "
                     "config.json describes another model than the checkpoint; use the config.json it was saved with, "
                     "or remove those tensors")
    return "; ".join(parts)


def _checkpoint_shapes(weights: Path, keys: list[str], prefix: str) -> dict[str, tuple]:
    """The shapes these keys have in the weights file (read from the safetensors header, or a safe mmap load of a
    .bin); a key may carry the base model's prefix there (`bert.` for a BertForMaskedLM checkpoint)."""
    out = {}
    try:
        if weights.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(weights), "pt") as f:
                names = set(f.keys())
                for k in keys:
                    name = k if k in names else f"{prefix}.{k}" if f"{prefix}.{k}" in names else None
                    if name is not None:
                        out[k] = tuple(f.get_slice(name).get_shape())
        else:
            import torch

            with open(weights, "rb") as f:
                zipped = f.read(4) == b"PK\x03\x04"  # mmap reads only torch's zip format
            state = torch.load(str(weights), map_location="cpu", weights_only=True, mmap=zipped)
            for k in keys:
                t = state.get(k, state.get(f"{prefix}.{k}"))
                if t is not None:
                    out[k] = tuple(t.shape)
    except Exception:  # the shapes are a courtesy: the refusal stands without them
        pass
    return out


def _shape(shape: tuple | None) -> str:
    return "[?]" if shape is None else "[" + ", ".join(map(str, shape)) + "]"


def _mismatch_message(model, mismatched: list[str], weights: Path) -> str:
    """Checkpoint shape vs the config's for the first tensors, and the config entry the commonest difference
    points at (hidden_size 768 where the weights hold 384)."""
    from collections import Counter

    ours = dict(model.state_dict())
    theirs = _checkpoint_shapes(weights, mismatched, getattr(model, "base_model_prefix", "") or "")
    rows = [(k, theirs.get(k), tuple(ours[k].shape) if k in ours else None) for k in mismatched]
    listed = ", ".join(f"{k} is {_shape(a)} in the checkpoint but {_shape(b)} by config.json" for k, a, b in rows[:3])
    more = f" and {len(rows) - 3} more" if len(rows) > 3 else ""
    pairs = Counter((x, y) for _, a, b in rows if a is not None and b is not None and len(a) == len(b)
                    for x, y in zip(b, a) if x != y)
    fix = "fix config.json or use the checkpoint that matches it"
    if pairs:
        (wanted, held), _ = pairs.most_common(1)[0]
        keys = _config_keys_equal(model, int(wanted))
        if keys:
            fix = (f"config.json's {' or '.join(keys[:3])} is {wanted} but the weights hold {held}: set it to {held} "
                   "or use the checkpoint that matches config.json")
    return (f"{len(rows)} tensor(s) have other shapes in the checkpoint than config.json gives, which transformers "
            f"would initialise randomly ({listed}{more}); {fix}")


# ---------------------------------------------------------------- the weights file itself


def what_file_is(head: bytes, size: int) -> str:
    """What a file's first bytes say it is, in words (for a refusal)."""
    text = head.lstrip()[:64].lower()
    if size == 0:
        return "an empty file (0 bytes)"
    if head.startswith(b"GGUF"):
        return "a GGUF file"
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive"
    if len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return f"a Python pickle (protocol {head[1]})"
    if head.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer (the file itself was never fetched: run `git lfs pull`)"
    if text.startswith((b"<!doctype html", b"<html")) or b"<html" in text:
        return "an HTML page (a failed download?)"
    if text.startswith((b"{", b"[")):
        return "a JSON file"
    if head.startswith(b"\x89HDF"):
        return "an HDF5 file (a Keras / TensorFlow checkpoint)"
    if len(head) >= 10 and head[8:10] == b'{"':
        return "a safetensors file"
    return f"a file of unknown format (it starts with {head[:8]!r})"


SAFETENSORS_HEADER_LIMIT = 100_000_000  # the safetensors library refuses a longer header


def check_weights_file(weights: Path, spec: str) -> None:
    """Refuse a weights file that is not what its name says, or a truncated safetensors file, before transformers
    reads it (sizes from the safetensors header: 8 + header length + the end of the last tensor's data)."""
    size = weights.stat().st_size
    with open(weights, "rb") as f:
        head = f.read(64)
    if weights.suffix == ".safetensors":
        n = int.from_bytes(head[:8], "little") if len(head) >= 8 else 0
        if size < 8 or head[8:9] != b"{" or n > min(size, SAFETENSORS_HEADER_LIMIT):
            if size < n <= SAFETENSORS_HEADER_LIMIT and head[8:9] == b"{":  # cut inside its own header
                raise UsageError(f"'{spec}': {weights.name} is truncated: {size:,} bytes, but its header alone is "
                                 f"{n + 8:,}; download or copy it again")
            raise UsageError(f"'{spec}': {weights.name} is {what_file_is(head, size)}, not a safetensors file; "
                             "replace it with the model's real model.safetensors")
        try:
            with open(weights, "rb") as f:
                f.seek(8)
                header = json.loads(f.read(n))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            raise UsageError(f"'{spec}': {weights.name} has an unreadable safetensors header ({type(e).__name__}); "
                             "download or save it again") from None
        if size < 8 + n + end:
            raise UsageError(f"'{spec}': {weights.name} is truncated: {size:,} bytes, but its header places tensor "
                             f"data up to byte {8 + n + end:,} ({8 + n + end - size:,} missing); download or copy it again")
        return
    if not (head.startswith(b"PK\x03\x04") or (len(head) > 1 and head[0] == 0x80)):
        raise UsageError(f"'{spec}': {weights.name} is {what_file_is(head, size)}, not a PyTorch checkpoint; "
                         "save the weights as model.safetensors (or give the model's real pytorch_model.bin)")


def load_failure(e: Exception, weights: Path, spec: str) -> str:
    """One line for an exception from `from_pretrained`: a weights file that does not read gets our own words (what
    the file is, why it does not read, the fix); anything else transformers' first line."""
    name = type(e).__name__
    if weights.suffix == ".bin":
        reason = _pickle_failure(weights)
        if reason is None and "pytorch checkpoint" in str(e):  # it unpickles, but not into a state dict
            reason = "it unpickles safely, but not into a state dict of tensors transformers can load"
        if reason:
            with open(weights, "rb") as f:
                head = f.read(64)
            kind = "a zip archive as torch.save writes" if head.startswith(b"PK\x03\x04") else what_file_is(head, weights.stat().st_size)
            return (f"'{spec}': {weights.name} ({weights.stat().st_size:,} bytes, {kind}) could not be read as a "
                    f"PyTorch checkpoint: {reason}; save the weights as model.safetensors (safetensors.torch.save_file, "
                    "where the checkpoint is trusted) and remove the .bin")
    if name == "SafetensorError":
        return f"'{spec}': {weights.name} could not be read as safetensors ({_one_line(e)}); download or save it again"
    first = str(e).splitlines()[0] if str(e) else ""
    return f"'{spec}': transformers could not load the model ({name}: {first})"


def _pickle_failure(weights: Path) -> str | None:
    """Why a safe (weights-only) torch.load of this file fails, or None when it reads. Nothing in the file is
    executed: weights-only unpickling refuses any global it does not know."""
    import re
    import warnings

    import torch

    with open(weights, "rb") as f:
        zipped = f.read(4) == b"PK\x03\x04"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.load(str(weights), map_location="cpu", weights_only=True, mmap=zipped)
    except Exception as e:
        text = _one_line(e)
        if m := re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", text):
            return (f"it holds a Python object ({m.group(1)}) besides tensors, which a safe load refuses "
                    "(it was not executed)")
        if "Weights only load failed" in text or type(e).__name__ == "UnpicklingError":
            m = re.search(r"WeightsUnpickler error: (.*?)(?: Check the documentation|$)", text)
            why = f" ({m.group(1).strip().rstrip('.')})" if m and m.group(1).strip() else ""
            return f"its pickle is not one a safe (weights-only) load reads{why}; nothing in it was executed"
        if "central directory" in text or "zip archive" in text:
            return "the zip archive is damaged or truncated"
        if "EOF" in text:
            return "it is truncated"
        return f"{type(e).__name__}: {text[:200]}"
    return None
