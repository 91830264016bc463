"""Calibration data: the user's own (`[data] calibration = PATH`) drives every calibrating pass, the built-in image
sets are natural photographs with calibration and validation drawn from different packages, and bad data is refused
in one line before any model loads."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from compressor.errors import UsageError
from compressor.passes import Distill, LayerPrune, LearnedRates, SliceGPT, WidthPrune
from compressor.pipeline.context import PassContext
from compressor.pipeline.recipe import load_recipe, resolve_recipe
from compressor.program.handle import load
from compressor.sources import data, photos
from compressor.sources.inputs import calibration_description, calibration_inputs, preprocessor
from compressor.targets import target_for

from .conftest import SMALL_IMAGE, SMALL_TEXT, compress


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def news(tmp_path_factory) -> Path:
    """Real English news sentences (the Lee background corpus), one a line."""
    path = tmp_path_factory.mktemp("cal") / "news.txt"
    path.write_text("\n".join(data.background_sentences()[:48]) + "\n")
    return path


@pytest.fixture(scope="module")
def code(tmp_path_factory) -> Path:
    """Another real text, of another kind: this project's Python source, in paragraphs (blank lines between)."""
    source = (Path(__file__).resolve().parents[1] / "compressor" / "sources" / "data.py").read_text()
    path = tmp_path_factory.mktemp("cal") / "code.txt"
    path.write_text(source)
    return path


def save_images(folder: Path, images) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        im.save(folder / f"{i:03d}.png")
    return folder


def recipe_file(tmp_path: Path, passes: str, data_lines: str, model: str = "example:dinov2-small") -> Path:
    shape = "image_size = [112, 112]" if "dinov2" in model else "seq_len = 64"
    path = tmp_path / "recipe.toml"
    path.write_text(f'[model]\nsource = "{model}"\n{passes}\n[export]\nbatch = 2\n{shape}\n[data]\n{data_lines}\n')
    return path


def test_text_files_are_lines_or_paragraphs():
    assert data.split_text_samples("one text\nanother text\n") == (["one text", "another text"], "lines")
    assert data.split_text_samples("a paragraph\nwraps here\n\nthe next one\n") == (
        ["a paragraph wraps here", "the next one"], "paragraphs")


def test_default_image_calibration_and_validation_are_disjoint_natural_photographs():
    """Calibration crops come from a Debian package, validation photos from the scikit-image / scikit-learn wheels
    and matplotlib: no file (path or content) in both, and every input is a colour photograph, not 28 x 28 grey."""
    cal, val = photos.calibration_photo_files(), photos.validation_photo_files()
    assert all(f.is_relative_to(photos.CALIBRATION_DIR) for f in cal)
    assert not any(f.is_relative_to(photos.CALIBRATION_DIR) for f in val)
    assert not {sha(f) for f in cal} & {sha(f) for f in val}
    views = photos.validation_views(8)
    assert len({v.tobytes() for v in views}) == 8 and min(min(v.size) for v in views) >= 300  # 8 different photos
    crops = photos.calibration_crops(16, seed=42, size=(112, 112))
    assert crops[:4] == photos.calibration_crops(4, seed=42, size=(112, 112))  # a prefix of a larger draw
    assert len({c.tobytes() for c in crops}) == 16 and all(c.size == (112, 112) for c in crops)
    assert data.image_split("validation", 3)[0].tobytes() == views[0].tobytes()


@pytest.fixture(scope="module")
def minilm():
    return load("example:minilm", **SMALL_TEXT)


def fresh(handle, path: Path | None = None):
    """A copy of a loaded model, given `path` as its calibration data (what `run_recipe` does after loading)."""
    import copy

    handle = copy.deepcopy(handle)
    data.attach_calibration(handle, {"calibration": str(path)} if path else {})
    return handle


def run_pass(p, handle) -> dict:
    """The pass's record info (what the manifest's `passes` entry carries), without the pipeline's graph captures."""
    p.check(handle)
    return p.run(handle, PassContext.for_handle(handle)).info


def test_user_text_drives_layer_prune_and_distill(minilm, news, code):
    """The same pass on two real texts of different kinds scores the blocks differently; the inputs are the file's
    lines; distill asking for more than the file holds is refused with both counts."""
    influence = {path.name: run_pass(LayerPrune(blocks=1, calibration_samples=8, batch=4), fresh(minilm, path))["influence"]
                 for path in (news, code)}
    assert influence["news.txt"] != influence["code.txt"]
    handle = fresh(minilm, news)
    ids, mask = calibration_inputs(handle, 6, seed=3)
    feeds = preprocessor(handle)(news.read_text().splitlines())["input_ids"]
    assert all(any(torch.equal(row, torch.from_numpy(f)) for f in feeds) for row in ids)
    assert calibration_description(handle) == f"48 lines from {news} (sha256 {sha(news)[:12]})"
    with pytest.raises(UsageError, match="distill: .* holds 48 lines; samples \\+ eval_samples asks for 64"):
        run_pass(Distill(steps=2, batch=2, samples=60, eval_samples=4), handle)


def test_pruning_and_learned_rates_records_name_their_calibration_data(minilm, news):
    """width_prune, layer_prune and learned_rates name what they calibrated on in their records (the manifest's
    `passes[i].info.calibration`), as slicegpt and distill do: the user's file with its hash, or the built-in set;
    layer_prune's depth metric reads no data and names none."""
    builtin = calibration_description(fresh(minilm))
    assert builtin.startswith("Wikipedia calibration paragraphs")
    for path, expected in ((news, f"48 lines from {news} (sha256 {sha(news)[:12]})"), (None, builtin)):
        for p in (WidthPrune(flops=0.9, importance="activation", calibration_samples=8, batch=4),
                  LayerPrune(blocks=1, calibration_samples=8, batch=4),
                  LearnedRates(flops=0.7, steps=1, batch=4, calibration_samples=8, exchanges=0)):
            assert run_pass(p, fresh(minilm, path))["calibration"] == expected, p.name
    assert "calibration" not in run_pass(LayerPrune(blocks=1, metric="depth"), fresh(minilm, news))


def test_user_text_becomes_token_windows_for_language_models(minilm, code):
    """A causal LM cuts its windows from the user's text (here tokenized with MiniLM's tokenizer: the windows are
    contiguous runs of the file's tokens), and a text too short for samples x length is refused with both counts."""
    from compressor.sources.lm_data import calibration_windows, tokenize_plain

    tok = Path(minilm.adapter.folder) / "tokenizer.json"
    cal = data.calibration_data({"calibration": str(code)}, target_for("causal_lm"))
    ids = tokenize_plain(tok, [cal.text()]).tolist()
    windows = calibration_windows(tok, 4, 32, seed=1, source=cal)
    text = " ".join(map(str, ids))
    assert all(" ".join(map(str, w.tolist())) in text for w in windows)
    with pytest.raises(UsageError, match=f"holds {len(ids):,} tokens; calibration_samples x calibration_len = 1000 x 512"):
        calibration_windows(tok, 1000, 512, source=cal)


def test_user_image_folder_drives_dinov2_calibration(tmp_path):
    """DINOv2's calibrating passes read the user's folder: the inputs are its images, two folders of different
    photographs make layer_prune score the blocks differently, and SliceGPT's record names the folder and hash."""
    from compressor.passes.slicegpt.calibration import calibration_samples

    a = save_images(tmp_path / "landscapes", photos.calibration_crops(8, seed=5, size=(112, 112)))
    b = save_images(tmp_path / "portraits", [im.resize((112, 112)) for im in photos.validation_views(8)])
    dense = load("example:dinov2-small", **SMALL_IMAGE)
    influence = {}
    for folder in (a, b):
        handle = fresh(dense, folder)
        (pixels,) = calibration_inputs(handle, 8)
        expected = preprocessor(handle)([data.open_image(f) for f in sorted(folder.iterdir())])["pixel_values"]
        assert torch.equal(pixels, torch.from_numpy(expected))
        cal = data.calibration_data({"calibration": str(folder)}, target_for("image"))
        _, info = calibration_samples(handle, PassContext.for_handle(handle).calibration, SliceGPT(calibration_samples=8).config)
        assert info == {"calibration_images": 8, "calibration": f"8 images from {folder} (sha256 {cal.sha256[:12]})"}
        influence[folder.name] = run_pass(LayerPrune(blocks=1, calibration_samples=8, batch=4), handle)["influence"]
    assert influence["landscapes"] != influence["portraits"]
    default = fresh(dense)
    assert calibration_description(default) == photos.CALIBRATION_DESCRIPTION
    assert not torch.equal(calibration_inputs(default, 8)[0], pixels)


def test_resolved_recipe_records_the_calibration_data(tmp_path, news):
    """Relative paths are relative to the recipe; resolution records the absolute path and the sha256, and a rerun
    with changed data is refused."""
    (tmp_path / "news.txt").write_text(news.read_text())
    recipe = recipe_file(tmp_path, '[[passes]]\nname = "layer_prune"\nblocks = 1\ncalibration_samples = 8',
                         'calibration = "news.txt"', model="example:minilm")
    resolved = resolve_recipe(load_recipe(recipe))
    assert resolved.to_dict()["data"] == {"calibration": str(tmp_path / "news.txt"),
                                          "calibration_sha256": sha(tmp_path / "news.txt")}
    (tmp_path / "news.txt").write_text("other text\n" * 8)
    again = load_recipe(recipe)
    again.data["calibration_sha256"] = resolved.data["calibration_sha256"]
    with pytest.raises(UsageError, match="changed since this recipe was resolved"):
        resolve_recipe(again)


CASES = {
    "missing": ("[data] calibration 'nowhere/' does not exist", 'calibration = "nowhere/"'),
    "empty": ("holds no .png/.jpg images", 'calibration = "empty"'),
    "too_few": ("holds 3 images; width_prune calibration_samples asks for 64", 'calibration = "three"'),
    "same_as_validation": ("name the same data", 'calibration = "three"\nimages = "three"'),
    "shared_image": ("share 1 image(s)", 'calibration = "three"\nimages = "held_out"'),
    "no_calibrating_pass": ("no pass of this recipe calibrates on data (token_merge)", 'calibration = "three"'),
}


def bad_recipe(tmp_path: Path, case: str) -> Path:
    crops = photos.calibration_crops(4, seed=9, size=(64, 64))
    save_images(tmp_path / "three", crops[:3])
    save_images(tmp_path / "held_out", crops[2:])
    (tmp_path / "empty").mkdir()
    passes = '[[passes]]\nname = "width_prune"\nflops = 0.8'
    if case in ("same_as_validation", "shared_image"):
        passes += "\ncalibration_samples = 3"
    if case == "no_calibrating_pass":
        passes = '[[passes]]\nname = "token_merge"\nr = 4'
    return recipe_file(tmp_path, passes, CASES[case][1])


def assert_refused(done, fragment: str, out: Path) -> None:
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0] and "Traceback" not in done.stderr, done.stderr
    assert not out.exists()


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_calibration_data_is_one_line_exit_2(tmp_path, capsys, case):
    """Refused while the recipe resolves, before the model loads: one line, exit 2, nothing written (in process:
    `main(argv)` is what the installed command runs)."""
    import subprocess

    from compressor.cli import main

    recipe, out = bad_recipe(tmp_path, case), tmp_path / "out"
    code = main(["run", str(recipe), "--output", str(out)])
    captured = capsys.readouterr()
    assert_refused(subprocess.CompletedProcess([], code, captured.out, captured.err), CASES[case][0], out)


def test_too_little_calibration_data_from_the_installed_command(tmp_path):
    recipe, out = bad_recipe(tmp_path, "too_few"), tmp_path / "out"
    assert_refused(compress("run", str(recipe), "--output", str(out), timeout=120), CASES["too_few"][0], out)


def test_speech_recipes_refuse_calibration_data():
    """Whisper's only pass takes no data: a calibration path would do nothing, so it is refused, not ignored."""
    from compressor.pipeline.recipe import recipe_from_dict

    recipe = recipe_from_dict({"model": {"source": "example:whisper-base"}, "passes": [{"name": "token_merge", "r": 150}],
                               "data": {"calibration": str(Path(__file__).parent)}})
    with pytest.raises(UsageError, match="no pass of a speech model calibrates on data"):
        resolve_recipe(recipe)
