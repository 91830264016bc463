"""The loader is the strict part: paths confined to the artifact, every file listed and hashed, a manifest schema,
optional Ed25519 signatures; every refusal is one line from the runtime's own errors, with torch unimportable.

The tamper matrix is built here (copies of the session's MiniLM artifact, hard-linked where a file is not changed) and
loaded in one subprocess where torch, transformers and onnx cannot be imported; each case is its own test.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from compressor.runtime import (ArtifactKindError, FeedError, ProviderError, RuntimeArtifactError, RuntimeUsageError,
                                load, resolve_providers)
from compressor.runtime.artifact import check_name, hash_folder, sha256_of
from compressor.artifact.sign import generate_keypair, sign_artifact
from compressor.runtime.signing import public_key

from .conftest import compress


# ---------------------------------------------------------------- building tampered copies
def _link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _rewrite(path: Path, data: bytes) -> None:
    """Replace a file's content without touching the hard-linked original."""
    path.unlink()
    path.write_bytes(data)


def _edit(folder: Path, change) -> None:
    """Apply change(manifest) (it edits in place; what it returns is ignored) and write manifest.json anew."""
    m = json.loads((folder / "manifest.json").read_text())
    change(m)
    _rewrite(folder / "manifest.json", json.dumps(m).encode())


def _rehash(folder: Path, *names: str) -> None:
    def change(m):
        for n in names:
            m["files"][n] = sha256_of(folder / n)
    _edit(folder, change)


def _external(folder: Path, location: str, data_dir: Path) -> None:
    """Move the graph's largest initializer into external data at `location` (written under data_dir), as onnx
    saves a big graph, and list the new graph's hash."""
    import onnx
    from onnx import TensorProto

    model = onnx.load(str(folder / "model.onnx"))
    tensor = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    (data_dir / Path(location).name).write_bytes(tensor.raw_data)
    size = len(tensor.raw_data)
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(size))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    _rewrite(folder / "model.onnx", model.SerializeToString())
    _rehash(folder, "model.onnx")


def _outside_files(root: Path, artifact: Path) -> Path:
    outside = root / "outside"
    outside.mkdir()
    for name in ("model.onnx", "tokenizer.json", "manifest.json"):
        _link_or_copy(artifact / name, outside / name)
    return outside


def _put(m: dict, key: str, value) -> None:
    m[key] = value


# id -> (build(folder, outside, keys), expected error class name or "loaded", fragment of the message)
CASES = {
    "untouched": (lambda f, o, k: None, "loaded", ""),
    "files_dotdot": (lambda f, o, k: _edit(f, lambda m: m["files"].update({"../../../../../etc/passwd": "0" * 64})),
                     "RuntimeArtifactError", "'../../../../../etc/passwd' is not a plain relative path"),
    "files_absolute": (lambda f, o, k: _edit(f, lambda m: m["files"].update({"/etc/hostname": "0" * 64})),
                       "RuntimeArtifactError", "'/etc/hostname' is not a plain relative path"),
    "files_backslash": (lambda f, o, k: _edit(f, lambda m: m["files"].update({"..\\..\\x": "0" * 64})),
                        "RuntimeArtifactError", "is not a plain relative path"),
    "model_file_dotdot": (lambda f, o, k: _edit(f, lambda m: _put(m, "model_file", "../outside/model.onnx")),
                          "RuntimeArtifactError", "model_file '../outside/model.onnx' is not a plain relative path"),
    "model_file_absolute": (lambda f, o, k: _edit(f, lambda m: _put(m, "model_file", str(o / "model.onnx"))),
                            "RuntimeArtifactError", "model_file '/.*' is not a plain relative path"),
    "model_file_not_in_files": (lambda f, o, k: (_link_or_copy(f / "model.onnx", f / "other.onnx"),
                                                  _edit(f, lambda m: _put(m, "model_file", "other.onnx"))),
                                "RuntimeArtifactError", "model_file 'other.onnx' is not listed in 'files'"),
    "tokenizer_outside": (lambda f, o, k: _edit(f, lambda m: m["preprocess"].update(tokenizer="../outside/tokenizer.json")),
                          "RuntimeArtifactError", "preprocess.tokenizer '../outside/tokenizer.json' is not a plain"),
    "tokenizer_absolute": (lambda f, o, k: _edit(f, lambda m: m["preprocess"].update(tokenizer=str(o / "tokenizer.json"))),
                           "RuntimeArtifactError", "preprocess.tokenizer '/.*' is not a plain relative path"),
    "tokenizer_not_in_files": (lambda f, o, k: (_link_or_copy(f / "tokenizer.json", f / "tok2.json"),
                                                 _edit(f, lambda m: m["preprocess"].update(tokenizer="tok2.json"))),
                               "RuntimeArtifactError", "preprocess.tokenizer 'tok2.json' is not listed in 'files'"),
    # the link's target has the listed hash: refused for leaving the folder, not for its content
    "model_symlink_out": (lambda f, o, k: ((f / "model.onnx").unlink(), (f / "model.onnx").symlink_to(o / "model.onnx")),
                          "RuntimeArtifactError", "'model.onnx' in artifact .* is a symbolic link out of the folder"),
    "folder_symlink_out": (lambda f, o, k: ((f / "extra").symlink_to(o, target_is_directory=True),
                                            _edit(f, lambda m: (m["files"].update({"extra/tokenizer.json": sha256_of(o / "tokenizer.json")}),
                                                                m["preprocess"].update(tokenizer="extra/tokenizer.json")))),
                           "RuntimeArtifactError", "'extra' in artifact .* is a symbolic link out of the folder"),
    "manifest_symlink_out": (lambda f, o, k: ((f / "manifest.json").unlink(),
                                              (f / "manifest.json").symlink_to(o / "manifest.json")),
                             "RuntimeArtifactError", "manifest.json is a symbolic link out of the artifact folder"),
    "manifest_is_a_list": (lambda f, o, k: _rewrite(f / "manifest.json", b"[1, 2, 3]"),
                           "RuntimeArtifactError", "must hold a JSON object, got a JSON array"),
    "manifest_not_json": (lambda f, o, k: _rewrite(f / "manifest.json", b"{\"format\": "),
                          "RuntimeArtifactError", "is not valid JSON"),
    "files_is_a_list": (lambda f, o, k: _edit(f, lambda m: _put(m, "files", list(m["files"]))),
                        "RuntimeArtifactError", "'files' must be a non-empty object of file name -> SHA-256"),
    "files_bad_digest": (lambda f, o, k: _edit(f, lambda m: m["files"].update({"model.onnx": "abc"})),
                         "RuntimeArtifactError", "must be a SHA-256 digest of 64 lowercase hex digits, got str 'abc'"),
    "model_file_missing": (lambda f, o, k: _edit(f, lambda m: m.pop("model_file")),
                           "RuntimeArtifactError", "'model_file' must be a file name listed in 'files', got nothing"),
    "inputs_empty": (lambda f, o, k: _edit(f, lambda m: _put(m, "inputs", [])),
                     "RuntimeArtifactError", "'inputs' must be a non-empty list of \\{name, shape, dtype\\} objects"),
    "inputs_not_objects": (lambda f, o, k: _edit(f, lambda m: _put(m, "inputs", [7])),
                           "RuntimeArtifactError", "'inputs\\[0\\]' must be an object with name, shape and dtype"),
    "preprocess_unknown_kind": (lambda f, o, k: _edit(f, lambda m: m["preprocess"].update(kind="video")),
                                "RuntimeArtifactError", "'preprocess.kind' must be one of text, image, causal_lm, speech"),
    "outputs_not_the_graphs": (lambda f, o, k: _edit(f, lambda m: m["outputs"][0].update(name="logits")),
                               "RuntimeArtifactError", "'inputs'/'outputs' do not match graph 'model.onnx'"),
    "extra_unlisted_file": (lambda f, o, k: (f / "model.onnx.data").write_bytes(b"\0" * 64),
                            "RuntimeArtifactError", "'model.onnx.data' is in artifact .* but not listed in manifest.json"),
    "hash_mismatch": (lambda f, o, k: _rewrite(f / "tokenizer.json", (f / "tokenizer.json").read_bytes() + b" "),
                      "RuntimeArtifactError", "'tokenizer.json' does not match its SHA-256"),
    # a graph naming external data outside the folder is refused from the graph itself, whatever onnxruntime does
    "external_data_escapes": (lambda f, o, k: _external(f, "../weights.bin", f.parent),
                              "RuntimeArtifactError", "external data of graph 'model.onnx' '../weights.bin' is not a plain"),
    "external_data_listed": (lambda f, o, k: (_external(f, "weights.bin", f), _rehash(f, "weights.bin")), "loaded", ""),
    # signing
    "signed_good": (lambda f, o, k: sign_artifact(f, k["key"]), "loaded", ""),
    "signed_raw_key": (lambda f, o, k: sign_artifact(f, k["key"]), "loaded", ""),
    "signed_then_manifest_edited": (lambda f, o, k: (sign_artifact(f, k["key"]),
                                                     _edit(f, lambda m: m["preprocess"].update(pad_id=1))),
                                    "RuntimeArtifactError", "does not verify with key ed25519:[0-9a-f]{16}: manifest.json "
                                                            "was changed after signing"),
    "unsigned_with_key": (lambda f, o, k: None, "RuntimeArtifactError", "is not signed \\(no manifest.sig\\) but a verify_key"),
    "signed_wrong_key": (lambda f, o, k: sign_artifact(f, k["other"]), "RuntimeArtifactError", "does not verify with key"),
    "signature_truncated": (lambda f, o, k: (f / "manifest.sig").write_bytes(b"x" * 10),
                            "RuntimeArtifactError", "holds 10 bytes, not a 64-byte Ed25519 signature"),
    "private_key_as_verify_key": (lambda f, o, k: sign_artifact(f, k["key"]), "RuntimeUsageError", "holds a private key"),
}
VERIFY_KEY = {"signed_good": "pub", "signed_raw_key": "raw", "signed_then_manifest_edited": "pub",
              "unsigned_with_key": "pub", "signed_wrong_key": "pub", "signature_truncated": "pub",
              "private_key_as_verify_key": "key"}

RUNNER = textwrap.dedent("""
    import json, sys
    for name in ("torch", "transformers", "onnx", "onnxscript"):
        sys.modules[name] = None  # any import of these now raises ImportError
    from compressor.runtime import RuntimeUsageError, load
    results = {}
    for case in json.loads(sys.stdin.read()):
        key = case["key"]
        key = bytes.fromhex(key["raw"]) if isinstance(key, dict) else key
        try:
            m = load(case["folder"], verify_key=key)
            results[case["id"]] = {"result": "loaded", "signature": m.signature,
                                   "embedding": m.embed(["a test sentence"])[0].tolist()}
        except Exception as e:
            results[case["id"]] = {"result": type(e).__name__, "message": str(e),
                                   "runtime_error": isinstance(e, RuntimeUsageError)}
    assert not any(k.startswith("torch") and sys.modules[k] is not None for k in sys.modules)
    print(json.dumps(results))
""")


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("keys")
    key, pub = generate_keypair(root / "build")
    other_key, _ = generate_keypair(root / "other")
    from cryptography.hazmat.primitives import serialization

    raw = public_key(pub).public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return {"key": key, "pub": pub, "other": other_key, "raw": {"raw": raw.hex()}}


@pytest.fixture(scope="module")
def matrix(minilm_artifact, keys, tmp_path_factory) -> dict:
    """Every case built, then loaded in one torch-free subprocess: {case id: what happened}."""
    root = tmp_path_factory.mktemp("tamper")
    outside = _outside_files(root, minilm_artifact)
    jobs = []
    for case, (build, _, _) in CASES.items():
        folder = root / case / "artifact"
        folder.parent.mkdir()
        shutil.copytree(minilm_artifact, folder, copy_function=_link_or_copy)
        build(folder, outside, keys)
        which = VERIFY_KEY.get(case)
        key = keys[which] if which else None
        jobs.append({"id": case, "folder": str(folder), "key": key if key is None or isinstance(key, dict) else str(key)})
    done = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(jobs), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("case", list(CASES))
def test_tampered_artifacts_are_refused_in_one_line_without_torch(matrix, case):
    _, expected, fragment = CASES[case]
    got = matrix[case]
    assert got["result"] == expected, got
    if expected == "loaded":
        assert np.allclose(got["embedding"], matrix["untouched"]["embedding"], atol=1e-5)
        if case.startswith("signed"):
            assert got["signature"]["signed"] and got["signature"]["verified"]
            assert got["signature"]["key"].startswith("ed25519:")
        else:
            assert got["signature"] == {"signed": False, "verified": False, "key": None}
        return
    import re

    assert got["runtime_error"] and "\n" not in got["message"], got
    assert re.search(fragment, got["message"]), got["message"]


# ---------------------------------------------------------------- names, hashing, checks after load
@pytest.mark.parametrize("name", ["../x", "a/../../x", "/etc/passwd", "a//b", "./a", "a/./b", "a/", "a\\b", "C:x",
                                  "", "x\x00y", 7, None])
def test_names_outside_the_folder_are_refused(name):
    with pytest.raises(RuntimeArtifactError, match="files") as info:
        check_name(name, "a name in 'files'")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["model.onnx", "hf/config.json", "1_Pooling/config.json", "model.onnx.data"])
def test_plain_names_are_accepted(name):
    assert check_name(name, "files") == name


@pytest.mark.slow
def test_a_file_changed_after_load_is_refused_when_first_opened(tmp_path, minilm_artifact):
    """The tokenizer is opened at the first embed(): it is hash-checked then, not only when load() ran."""
    folder = tmp_path / "artifact"
    shutil.copytree(minilm_artifact, folder, copy_function=_link_or_copy)
    m = load(folder)
    _rewrite(folder / "tokenizer.json", (folder / "tokenizer.json").read_bytes().replace(b"[UNK]", b"[UNX]", 1))
    with pytest.raises(RuntimeArtifactError, match="'tokenizer.json' does not match its SHA-256"):
        m.embed(["hello"])


def test_hash_folder_lists_every_file_but_the_manifest_and_its_signature(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("manifest.json", "manifest.sig", "model.onnx", "sub/manifest.json", "sub/manifest.sig"):
        (tmp_path / name).write_text(name)
    assert sorted(hash_folder(tmp_path)) == ["model.onnx", "sub/manifest.json", "sub/manifest.sig"]


# ---------------------------------------------------------------- signing from the command line, openssl interop
def _cli(*args: str) -> subprocess.CompletedProcess:
    """`compress` with the signing commands registered (whether or not app.py registers them already)."""
    code = textwrap.dedent("""
        import sys, typer
        from compressor.cli.app import app, main
        from compressor.cli.sign import register
        if "sign" not in typer.main.get_command(app).commands:
            register(app)
        sys.exit(main(sys.argv[1:]))
    """)
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_keygen_sign_verify_commands(tmp_path, minilm_artifact):
    folder = tmp_path / "artifact"
    shutil.copytree(minilm_artifact, folder, copy_function=_link_or_copy)
    done = _cli("keygen", "--out", str(tmp_path / "build"))
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE((tmp_path / "build.key").stat().st_mode) == 0o600
    assert (tmp_path / "build.pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")
    again = _cli("keygen", "--out", str(tmp_path / "build"))
    assert again.returncode == 2 and "already exists" in again.stderr
    done = _cli("sign", str(folder), "--key", str(tmp_path / "build.key"))
    assert done.returncode == 0 and (folder / "manifest.sig").stat().st_size == 64, done.stderr
    done = _cli("verify", str(folder), "--key", str(tmp_path / "build.pub"))
    assert done.returncode == 0 and "signature verified" in done.stdout, done.stderr
    _edit(folder, lambda m: m["preprocess"].update(pad_id=1))
    done = _cli("verify", str(folder), "--key", str(tmp_path / "build.pub"))
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "does not verify" in done.stderr


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_openssl_keys_and_signatures_interoperate(tmp_path, minilm_artifact):
    folder = tmp_path / "artifact"
    shutil.copytree(minilm_artifact, folder, copy_function=_link_or_copy)
    key, pub = tmp_path / "o.key", tmp_path / "o.pub"
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(key)], check=True)
    subprocess.run(["openssl", "pkey", "-in", str(key), "-pubout", "-out", str(pub)], check=True)
    subprocess.run(["openssl", "pkeyutl", "-sign", "-rawin", "-inkey", str(key), "-in", str(folder / "manifest.json"),
                    "-out", str(folder / "manifest.sig")], check=True)
    assert load(folder, verify_key=pub).signature["verified"]
    sign_artifact(folder, key)  # ours, verified by openssl
    check = subprocess.run(["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", str(pub), "-rawin", "-in",
                            str(folder / "manifest.json"), "-sigfile", str(folder / "manifest.sig")],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.slow
def test_inspect_of_a_tampered_artifact_is_one_line_and_exit_2(tmp_path, minilm_artifact):
    folder = tmp_path / "artifact"
    shutil.copytree(minilm_artifact, folder, copy_function=_link_or_copy)
    _edit(folder, lambda m: m.pop("model_file"))
    done = compress("inspect", str(folder))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: ") and "'model_file'" in done.stderr
    _rewrite(folder / "manifest.json", b"[]")
    done = compress("inspect", str(folder))
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "JSON array" in done.stderr


# ---------------------------------------------------------------- the runtime's small one-liners
@pytest.mark.slow
def test_wrong_kind_and_lone_surrogates_are_one_line(minilm_artifact):
    m = load(minilm_artifact)
    for call in ("generate", "transcribe", "perplexity"):
        with pytest.raises(ArtifactKindError, match=f"{call}\\(\\) is for a .*this artifact is a text encoder \\(text\\), "
                                                    f"which has embed\\(\\), run\\(\\)") as info:
            getattr(m, call)("x")
        assert isinstance(info.value, RuntimeUsageError) and "\n" not in str(info.value)
    assert not hasattr(m, "generate") and hasattr(m, "embed")  # still an AttributeError for hasattr
    with pytest.raises(FeedError, match="item 1 is not valid Unicode \\(a lone surrogate '\\\\ud800' at character 3\\)"):
        m.embed(["fine", "abc\ud800"])


def test_provider_refusal_names_the_cli_flag_too():
    with pytest.raises(ProviderError, match=r"allow_fallback=True \(CLI: --allow-cpu-fallback\)"):
        resolve_providers(["cuda"], available=["CPUExecutionProvider"])


def test_verify_key_without_cryptography_is_one_line_naming_the_install(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        for name in ("torch", "cryptography"):
            sys.modules[name] = None  # as on a device where neither is installed
        from compressor.runtime import RuntimeUsageError, load
        try:
            load({str(tmp_path)!r}, verify_key="build.pub")
        except RuntimeUsageError as e:
            print(e)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") == 1 and "pip install cryptography" in done.stdout
