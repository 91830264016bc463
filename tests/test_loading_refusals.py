"""A model whose checkpoint does not fill the model its config describes is refused at load, before any pass, in one
line naming the tensors and the fix: layers missing or added, a renamed or unexpected tensor, a shape the config does
not give; so are a truncated GGUF or safetensors file and a pytorch_model.bin that a safe load cannot read (a
malicious pickle is never executed). Each broken folder is the real MiniLM example with one thing changed."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from compressor.cli.app import main
from compressor.errors import UsageError
from compressor.sources.source import load_source

from .conftest import compress


@pytest.fixture(scope="module")
def state(minilm_folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(minilm_folder / "model.safetensors"))


@pytest.fixture
def make(minilm_folder, state, tmp_path):
    """make(name, tensors=None, config=None, raw=None): a copy of the MiniLM folder with other weights, config entries
    or a weights file written as raw bytes."""

    def build(name: str, tensors: dict | None = None, config: dict | None = None, raw: tuple[str, bytes] | None = None) -> Path:
        from safetensors.torch import save_file

        dest = tmp_path / name
        dest.mkdir()
        for f in minilm_folder.iterdir():
            if f.is_file() and f.name not in ("model.safetensors", "pytorch_model.bin"):
                shutil.copy(f, dest / f.name)
        if config:
            merged = json.loads((minilm_folder / "config.json").read_text()) | config
            (dest / "config.json").write_text(json.dumps(merged))
        if raw is not None:
            (dest / raw[0]).write_bytes(raw[1])
        else:
            save_file(state if tensors is None else tensors, str(dest / "model.safetensors"))
        return dest

    return build


def refusal(spec) -> str:
    with pytest.raises(UsageError) as e:
        load_source(str(spec))
    message = str(e.value)
    assert "\n" not in message
    return message


def test_config_with_more_layers_than_the_weights_is_refused_before_any_pass(make, tmp_path, monkeypatch, capsys):
    """The trial's case: config.json says 8 layers over 6 layers of weights. It used to compile for 52 s with two
    random layers; now `compress run` stops at load, exit 2, one line, nothing written."""
    from compressor.pipeline.pass_manager import Pipeline

    folder = make("eight", config={"num_hidden_layers": 8})

    def no_pass(*args, **kwargs):
        raise AssertionError("a pass ran on a model that should have been refused")

    monkeypatch.setattr(Pipeline, "run", no_pass)
    out = tmp_path / "out"
    code = main(["run", "--model", str(folder), "--pass", "token_merge:r=8", "--output", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "says 8 layers (num_hidden_layers = 8) but the checkpoint holds 6" in err
    assert "encoder.layer.6-7" in err and "set num_hidden_layers to 6 in config.json" in err
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_config_with_fewer_layers_and_a_missing_block(make, state):
    fewer = refusal(make("four", config={"num_hidden_layers": 4}))
    assert "says 4 layers (num_hidden_layers = 4) but the checkpoint holds 6" in fewer
    assert "set num_hidden_layers to 6" in fewer
    hole = refusal(make("hole", {k: v for k, v in state.items() if not k.startswith("encoder.layer.2.")}))
    assert "lacks block(s) 2 of the 6 in encoder.layer" in hole and "randomly" in hole


def test_renamed_and_unexpected_tensors_are_named(make, state):
    renamed = dict(state)
    renamed["encoder.layer.0.attention.self.qry.weight"] = renamed.pop("encoder.layer.0.attention.self.query.weight")
    message = refusal(make("renamed", renamed))
    assert "lacks 1 tensor(s) BertModel needs (encoder.layer.0.attention.self.query.weight)" in message
    assert "holds 1 it has no place for (encoder.layer.0.attention.self.qry.weight)" in message
    assert "renamed tensors?" in message

    extra = dict(state)
    extra["encoder.layer.0.attention.self.extra.weight"] = torch.zeros(3, 3)
    message = refusal(make("extra", extra))
    assert "holds 1 tensor(s) BertModel has no place for (encoder.layer.0.attention.self.extra.weight)" in message

    many = {k: v for k, v in state.items() if ".attention.self.key." not in k}  # 12 tensors: five named, then a count
    message = refusal(make("many", many))
    assert "lacks 12 tensor(s)" in message and "and 7 more" in message


def test_a_task_head_or_a_missing_pooler_is_tolerated(make, state):
    """A classification head beside the encoder is not compiled; a checkpoint saved without BERT's pooler loads (no
    adapter reads it) and the randomly initialised pooler is dropped, so it is never published."""
    head = dict(state, **{"classifier.weight": torch.zeros(2, 384), "classifier.bias": torch.zeros(2)})
    adapter, _ = load_source(str(make("head", head)))
    assert adapter.model.pooler is not None
    adapter, _ = load_source(str(make("nopooler", {k: v for k, v in state.items() if not k.startswith("pooler.")})))
    assert adapter.model.pooler is None
    assert "pooler.dense.weight" not in adapter.model.state_dict()


def test_shape_mismatch_names_both_shapes_and_the_config_entry(make, state):
    wide = refusal(make("wide", config={"hidden_size": 768}))
    assert "embeddings.position_embeddings.weight is [512, 384] in the checkpoint but [512, 768] by config.json" in wide
    assert "and 94 more" in wide and "config.json's hidden_size is 768 but the weights hold 384: set it to 384" in wide

    narrow = dict(state)
    narrow["encoder.layer.1.intermediate.dense.weight"] = torch.zeros(1000, 384)
    message = refusal(make("narrow", narrow))
    assert "encoder.layer.1.intermediate.dense.weight is [1000, 384] in the checkpoint but [1536, 384]" in message
    assert "intermediate_size is 1536 but the weights hold 1000" in message


def test_truncated_or_foreign_safetensors(make, minilm_folder):
    data = (minilm_folder / "model.safetensors").read_bytes()
    message = refusal(make("cut", raw=("model.safetensors", data[: len(data) // 2])))
    assert f"model.safetensors is truncated: {len(data) // 2:,} bytes" in message and f"up to byte {len(data):,}" in message
    message = refusal(make("html", raw=("model.safetensors", b"<!DOCTYPE html><html><body>Not Found</body></html>")))
    assert "is an HTML page (a failed download?), not a safetensors file" in message


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_unreadable_pytorch_bin_gets_our_line_and_is_never_executed(make, state, tmp_path):
    garbage = refusal(make("garbage", raw=("pytorch_model.bin", bytes(range(256)) * 20)))
    assert "pytorch_model.bin is a file of unknown format" in garbage and "model.safetensors" in garbage
    assert "from_tf" not in garbage and "TF" not in garbage

    marker = tmp_path / "executed"
    torch.save({"w": torch.zeros(2), "payload": Payload(marker)}, tmp_path / "evil.bin")
    message = refusal(make("evil", raw=("pytorch_model.bin", (tmp_path / "evil.bin").read_bytes())))
    assert "could not be read as a PyTorch checkpoint: it holds a Python object (posix.system)" in message
    assert "save the weights as model.safetensors" in message and "from_tf" not in message
    message = refusal(make("evil4", raw=("pytorch_model.bin", pickle.dumps({"w": Payload(marker)}, protocol=4))))
    assert "a Python pickle (protocol 4)" in message and "nothing in it was executed" in message
    assert not marker.exists()

    torch.save(state, tmp_path / "good.bin")
    good = (tmp_path / "good.bin").read_bytes()
    message = refusal(make("cutbin", raw=("pytorch_model.bin", good[: len(good) // 2])))
    assert "the zip archive is damaged or truncated" in message
    adapter, info = load_source(str(make("goodbin", raw=("pytorch_model.bin", good))))
    assert info.weights_file == "pytorch_model.bin" and adapter.model.config.num_hidden_layers == 6


@pytest.fixture(scope="module")
def smollm2_gguf() -> Path:
    from compressor.sources.examples import example_gguf

    return example_gguf("smollm2")


def test_truncated_gguf_says_so_with_sizes(smollm2_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "cache"))
    size = smollm2_gguf.stat().st_size
    cut = tmp_path / "cut.gguf"
    with open(smollm2_gguf, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(4 << 20))  # the header (1.8 MB) and the first tensors
    message = refusal(cut)
    assert f"it is truncated: the file has {4 << 20:,} bytes but its tensor table needs {size:,}" in message
    assert f"({size - (4 << 20):,} missing)" in message
    with open(cut, "r+b") as f:
        f.truncate(1000)
    assert "truncated or damaged inside its header" in refusal(cut)
    assert not (tmp_path / "cache" / "gguf").exists() or not list((tmp_path / "cache" / "gguf").iterdir())

    head = smollm2_gguf.read_bytes()[:4096]
    future = tmp_path / "future.gguf"
    future.write_bytes(b"GGUF" + (9).to_bytes(4, "little") + head[8:])
    assert "it is GGUF version 9, the reader knows versions 2 and 3" in refusal(future)
    pointer = tmp_path / "pointer.gguf"
    pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 98362432\n")
    assert "cannot read this GGUF: it is a Git LFS pointer" in refusal(pointer)


def test_cli_refusals_are_one_line_exit_2_and_write_nothing(make, state, smollm2_gguf, tmp_path):
    """Through the real entry point: the shape mismatch keeps both shapes, the truncated GGUF its sizes."""
    cut = tmp_path / "cut.gguf"
    with open(smollm2_gguf, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(3 << 20))
    wide = make("wide", config={"hidden_size": 768})
    for model, expected in ((wide, "[512, 384] in the checkpoint but [512, 768] by config.json"),
                            (cut, f"the file has {3 << 20:,} bytes but its tensor table needs")):
        out = tmp_path / f"out-{model.stem}"
        result = compress("run", "--model", str(model), "--pass", "token_merge:r=8", "--output", str(out), timeout=120)
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and expected in result.stderr, result.stderr
        assert "Traceback" not in result.stderr and not out.exists()
