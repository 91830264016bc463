"""A loaded artifact: an onnxruntime session with checked feeds, plus pre-processing helpers."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .artifact import graph, member, REBUILD
from .errors import ArtifactKindError, FeedError, FeedTypeError, RuntimeArtifactError, RuntimeUsageError
from .preprocess import ImagePreprocessor, TextPreprocessor, as_list, load_tokenizer
from .providers import check_session_providers, resolve_providers

# the embedding call each encoder kind (the manifest's preprocess.kind) takes; other kinds have none
EMBED_CALLS = {"text": "embed", "image": "embed_images"}


class TruncationWarning(UserWarning):
    """Texts longer than the compiled sequence length were cut to it."""


def check_threads(threads) -> None:
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise FeedTypeError(f"threads must be a positive int or None, got {threads!r}")


def make_session(model_path: Path, providers=None, threads: int | None = None,
                 allow_fallback: bool = False) -> ort.InferenceSession:
    """An onnxruntime session on the requested execution providers (CPU by default; see providers.py)."""
    check_threads(threads)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    chosen = resolve_providers(providers, allow_fallback)
    session = ort.InferenceSession(str(model_path), sess_options=opts, providers=chosen)
    check_session_providers(session, chosen, allow_fallback)
    return session


def run_in_batches(run, feeds: dict[str, np.ndarray], batch: int) -> np.ndarray:
    """Split any number of samples into static batches, repeat the last sample to fill the final one, and stack
    the first output of `run(feeds)` without the filler rows."""
    n = next(iter(feeds.values())).shape[0]
    out = []
    for start in range(0, n, batch):
        chunk = {k: v[start:start + batch] for k, v in feeds.items()}
        short = batch - next(iter(chunk.values())).shape[0]
        if short:
            chunk = {k: np.concatenate([v, np.repeat(v[-1:], short, axis=0)]) for k, v in chunk.items()}
        out.append(run(chunk)[: batch - short])
    return np.concatenate(out)


def bucket_graphs(manifest: dict) -> list[tuple[int, str]]:
    """(seq_len, model file) of every static text graph, shortest first, the compiled seq_len last; [] for an
    artifact compiled without length buckets."""
    entries = manifest.get("export", {}).get("buckets") or []
    return sorted((int(e["seq_len"]), e["model_file"]) for e in entries)


def route(feeds: dict[str, np.ndarray], seq_lens: list[int]):
    """Yield (seq_len, row indices, feeds cut to seq_len) per bucket that gets texts: each text goes to the smallest
    bucket that holds its real length (feeds are right-padded to the longest bucket, so cutting loses no token)."""
    lengths = feeds["attention_mask"].sum(1)
    which = np.minimum(np.searchsorted(seq_lens, lengths, side="left"), len(seq_lens) - 1)
    for k, seq_len in enumerate(seq_lens):
        rows = np.flatnonzero(which == k)
        if len(rows):
            yield seq_len, rows, {name: np.ascontiguousarray(v[rows, :seq_len]) for name, v in feeds.items()}


# what each kind of artifact offers, for the one line that answers a method called on the wrong kind
KIND_METHODS = {
    "text": ("text encoder", ["embed", "run"]),
    "image": ("vision encoder", ["embed_images", "run"]),
    "causal_lm": ("language model", ["generate", "generate_batch", "stream", "logits", "perplexity", "encode", "decode",
                                     "run"]),
    "speech": ("speech model", ["transcribe", "transcribe_ids", "features", "encode_audio", "run"]),
}
METHOD_KIND = {name: kind for kind, (_, names) in KIND_METHODS.items() for name in names if name != "run"}


class CompiledModel:
    """A loaded artifact. load() builds it with `strict=True`: every file it opens then goes through artifact.member
    (confined to the folder, listed in the manifest, SHA-256 checked) and every graph through artifact.graph (its
    external data too). The compiler builds models on its own folders as they are (`strict=False`)."""

    def __init__(self, folder: Path, manifest: dict, providers=None, threads: int | None = None,
                 allow_fallback: bool = False, *, strict: bool = False):
        self.folder = folder
        self.manifest = manifest
        self.strict = strict
        self.signature = {"signed": False, "verified": False, "key": None}  # load() fills it in
        self.session = self._session(manifest["model_file"], "model_file", providers, threads, allow_fallback)
        self._check_io(self.session, manifest["model_file"])
        # length buckets: seq_len -> session, the compiled seq_len's being self.session ({} without buckets)
        self.buckets = {seq: self.session if file == manifest["model_file"] else
                        self._session(file, "export.buckets model_file", providers, threads, allow_fallback)
                        for seq, file in bucket_graphs(manifest)}
        self.inputs = {i["name"]: i for i in manifest["inputs"]}
        self.outputs = [o["name"] for o in manifest["outputs"]]
        first = manifest["inputs"][0]["shape"][0]
        self.batch = first if isinstance(first, int) else None  # None: a dynamic batch
        pre = manifest.get("preprocess", {})
        self.kind = pre.get("kind")
        self._pre = pre
        self._preprocessor = None
        self._warned_truncation = False
        self._tokenizer = None

    def _file(self, name: str, key: str) -> Path:
        """The path of a file the model opens, by its name in the manifest (`key` says where, for messages)."""
        return member(self.folder, self.manifest, name, key) if self.strict else self.folder / name

    def _session(self, name: str, key: str, providers, threads, allow_fallback) -> ort.InferenceSession:
        """A session on the graph the manifest names; with `strict`, its external data verified too and a graph
        onnxruntime cannot open is one RuntimeArtifactError line."""
        if not self.strict:
            return make_session(self.folder / name, providers, threads, allow_fallback)
        path = graph(self.folder, self.manifest, name, key)
        try:
            return make_session(path, providers, threads, allow_fallback)
        except RuntimeUsageError:
            raise
        except Exception as e:
            if not type(e).__module__.startswith("onnxruntime"):
                raise
            reason = " ".join(str(e).split())[:300]
            raise RuntimeArtifactError(f"onnxruntime cannot open graph '{name}' ({reason}); {REBUILD}") from None

    def _check_io(self, session: ort.InferenceSession, name: str) -> None:
        """With `strict`, the graph takes exactly the inputs the manifest lists and gives the outputs it lists."""
        if not self.strict:
            return
        graph_inputs = {i.name for i in session.get_inputs()}
        graph_outputs = {o.name for o in session.get_outputs()}
        listed_inputs = {i["name"] for i in self.manifest["inputs"]}
        listed_outputs = {o["name"] for o in self.manifest["outputs"]}
        if listed_inputs != graph_inputs or not listed_outputs <= graph_outputs:
            wrong = sorted(listed_inputs ^ graph_inputs) or sorted(listed_outputs - graph_outputs)
            raise RuntimeArtifactError(f"manifest.json 'inputs'/'outputs' do not match graph '{name}' (differ on "
                                       f"{', '.join(wrong[:3])}); {REBUILD}")

    def __getattr__(self, name: str):
        """A method of another kind of artifact (generate() on a text encoder): one line naming what this one has."""
        if name in METHOD_KIND or name == "tokenizer":  # (a property raising AttributeError lands here too)
            self._wrong_kind(name)
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def _wrong_kind(self, name: str):
        kind = self.__dict__.get("kind")
        what, methods = KIND_METHODS.get(kind, ("model", ["run"]))
        has = ", ".join(m + "()" for m in methods)
        if name == "tokenizer":
            raise ArtifactKindError(f"this artifact is a {what} ({kind}): it carries no tokenizer, and has {has}")
        raise ArtifactKindError(f"{name}() is for a {KIND_METHODS[METHOD_KIND[name]][0]}; this artifact is a {what} "
                                f"({kind}), which has {has}")

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    @property
    def tokenizer(self):
        """The artifact's own tokenizer (text encoders, language models and speech), loaded on first use."""
        if self._tokenizer is None:
            if not isinstance(self._pre.get("tokenizer"), str):
                self._wrong_kind("tokenizer")
            self._tokenizer = load_tokenizer(self._file(self._pre["tokenizer"], "preprocess.tokenizer"))
        return self._tokenizer

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one compiled batch; feeds must match the compiled names, shapes and dtypes exactly."""
        if not isinstance(feeds, dict):
            raise FeedTypeError(f"run() takes a dict of input name -> numpy array, got {type(feeds).__name__}")
        missing, extra = set(self.inputs) - set(feeds), set(feeds) - set(self.inputs)
        if missing or extra:
            raise FeedError(f"inputs must be exactly {sorted(self.inputs)} (missing {sorted(missing)}, unexpected {sorted(extra)})")
        for name, spec in self.inputs.items():
            arr = feeds[name]
            if not isinstance(arr, np.ndarray):
                raise FeedTypeError(f"input '{name}' must be a numpy array, got {type(arr).__name__}")
            if arr.ndim != len(spec["shape"]) or any(isinstance(want, int) and got != want for got, want in zip(arr.shape, spec["shape"])):
                raise FeedError(f"input '{name}' has shape {list(arr.shape)}; this artifact was compiled for {spec['shape']}")
            if arr.dtype != np.dtype(spec["dtype"]):
                raise FeedError(f"input '{name}' has dtype {arr.dtype}; expected {spec['dtype']}")
        return dict(zip(self.outputs, self.session.run(self.outputs, feeds)))

    def _run_padded(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """Split any number of samples into compiled batches, padding the last one, and stack the first output."""
        if next(iter(feeds.values())).shape[0] == 0:
            return np.zeros((0,) + tuple(self.manifest["outputs"][0]["shape"][1:]), np.float32)
        return run_in_batches(lambda chunk: self.run(chunk)[self.outputs[0]], feeds, self.batch)

    def _run_routed(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """Each text through the smallest length bucket that holds it, in static batches; rows in input order."""
        n = next(iter(feeds.values())).shape[0]
        out = np.zeros((n,) + tuple(self.manifest["outputs"][0]["shape"][1:]), np.float32)
        for seq_len, rows, part in route(feeds, sorted(self.buckets)):
            session = self.buckets[seq_len]
            out[rows] = run_in_batches(lambda chunk: session.run(self.outputs[:1], chunk)[0], part, self.batch)
        return out

    def embed(self, texts: list[str]) -> np.ndarray:
        """Embed texts with a text encoder: tokenize, pad/truncate to the compiled length, batch, pool.

        Longer texts are cut to the compiled length (fixed at compile time); the first time that happens a
        TruncationWarning says how many, once per model, so a long-document workload does not go unnoticed. An
        artifact compiled with length buckets runs each text in the shortest graph that holds it.
        """
        if self.kind not in EMBED_CALLS:
            self._wrong_kind("embed")
        texts = as_list(texts, "embed()", "strings", lambda t: isinstance(t, str))
        if EMBED_CALLS[self.kind] != "embed":
            raise FeedError("embed() is for text encoders; this artifact is a vision encoder: use embed_images()")
        if self._preprocessor is None:
            seq_len = int(self.inputs["input_ids"]["shape"][1])
            self._preprocessor = TextPreprocessor(self._file(self._pre["tokenizer"], "preprocess.tokenizer"), seq_len,
                                                  int(self._pre["pad_id"]))
        feeds = self._preprocessor(texts)
        cut = self._preprocessor.last_truncated
        if cut and not self._warned_truncation:
            self._warned_truncation = True
            warnings.warn(f"{cut} of {len(texts)} texts are longer than this artifact's compiled length of "
                          f"{self._preprocessor.seq_len} tokens and were truncated to it (compile with a larger "
                          f"--seq-len to keep more); shown once per model", TruncationWarning, stacklevel=2)
        return self._run_routed(feeds) if self.buckets else self._run_padded(feeds)

    def embed_images(self, images) -> np.ndarray:
        """Embed PIL images or uint8 arrays with a vision encoder (resized and normalised as compiled)."""
        if self.kind not in EMBED_CALLS:
            self._wrong_kind("embed_images")
        images = ImagePreprocessor.image_list(images, "embed_images()")
        if EMBED_CALLS[self.kind] != "embed_images":
            raise FeedError("embed_images() is for vision encoders; this artifact is a text encoder: use embed()")
        if self._preprocessor is None:
            self._preprocessor = ImagePreprocessor.from_config(self._pre)
        return self._run_padded(self._preprocessor(images))
