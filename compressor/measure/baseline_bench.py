"""Speed against what a user would run instead, on stated length distributions.

Per distribution (text: short Lee background sentences, Lee documents, held-out Wikipedia passages that fill the
compiled length; images: one), the same texts run through:
- the artifact as the runtime runs it: batches of its batch size padded to the compiled length, or, when it was
  compiled with length buckets, each text in the shortest bucket graph holding it (static batches, filler rows);
- `static`: the dense export at the same static shapes;
- `dynamic`: the dense model with dynamic axes, texts sorted by length, batches of the same size, each padded to its
  longest (what a dynamic-shape user does);
- `fused`: that model as optimum exports it, after onnxruntime's transformer optimizer (fusions recorded);
- `fused_int8`: the fused model with INT8 dynamic quantization.
Runs are interleaved, medians compared; each row also gets its cosine to the dense model on one batch (a check that
the baseline computes the same function, and what INT8 costs).
"""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np

from compressor.validation.encoder import cosine_rows
from compressor.runtime.artifact import read_manifest
from compressor.runtime.model import bucket_graphs, make_session, route, run_in_batches
from compressor.targets import target_of


def length_distributions(manifest: dict, samples: int) -> dict[str, tuple[str, list]]:
    """name -> (what the data is, raw samples), `samples` rounded up to whole batches."""
    from compressor.sources import data
    from compressor.sources.inputs import wiki_windows
    from compressor.sources.photos import VALIDATION_DESCRIPTION

    b = manifest["shapes"]["batch"]
    n = -(-samples // b) * b
    if not target_of(manifest).text:
        return {"images": (f"{VALIDATION_DESCRIPTION}, resized to {manifest['shapes']['image_size']}",
                           data.image_split("validation", n))}
    seq = manifest["shapes"]["seq_len"]
    docs = data.lee_documents()
    return {
        "short": ("Lee background sentences (end of the corpus)", data.text_split("validation", n)),
        "paragraphs": ("Lee corpus documents", (docs * (n // len(docs) + 1))[:n]),
        "long": (f"held-out Wikipedia passages of {seq} words", wiki_windows(n, seq)),
    }


def _preprocess(path: Path, manifest: dict, samples: list) -> dict[str, np.ndarray]:
    from compressor.runtime.preprocess import ImagePreprocessor, TextPreprocessor

    pre, shapes = manifest["preprocess"], manifest["shapes"]
    if target_of(manifest).text:
        return TextPreprocessor(path / pre["tokenizer"], shapes["seq_len"], pre["pad_id"])(samples)
    return ImagePreprocessor(pre["size"], pre["mean"], pre["std"], pre.get("resample", "bicubic"))(samples)


def static_batches(feeds: dict, batch: int) -> list[dict]:
    n = next(iter(feeds.values())).shape[0]
    return [{k: v[i:i + batch] for k, v in feeds.items()} for i in range(0, n, batch)]


def length_batches(feeds: dict, batch: int) -> list[dict]:
    """Sorted by real length, batches of `batch`, each cut to its longest sample (images: as static)."""
    if "attention_mask" not in feeds:
        return static_batches(feeds, batch)
    lengths = feeds["attention_mask"].sum(1)
    order = np.argsort(lengths, kind="stable")
    out = []
    for i in range(0, len(order), batch):
        idx = order[i:i + batch]
        longest = int(lengths[idx].max())
        out.append({k: np.ascontiguousarray(v[idx, :longest]) for k, v in feeds.items()})
    return out


class Batches:
    """One timed call = every batch of the distribution through one session (feeds filtered to its inputs)."""

    def __init__(self, session, batches: list[dict]):
        names = {i.name for i in session.get_inputs()}
        self.session = session
        self.batches = [{k: v for k, v in b.items() if k in names} for b in batches]

    def run(self, _outputs=None, _feeds=None):
        return [self.session.run(None, b)[0] for b in self.batches]


class Routed:
    """The artifact as CompiledModel.embed runs it with length buckets: each text in the smallest bucket holding it,
    static batches with filler rows (the routing and filling are timed too); `ordered` gives rows in input order."""

    def __init__(self, buckets: dict, feeds: dict, batch: int):
        self.batch, self.n = batch, next(iter(feeds.values())).shape[0]
        self.buckets, self.feeds = buckets, feeds
        self.counts = {seq: len(rows) for seq, rows, _ in route(feeds, sorted(buckets))}
        self.padded_tokens = sum(-(-n // batch) * batch * seq for seq, n in self.counts.items())

    def run(self, _outputs=None, _feeds=None):
        return [(rows, run_in_batches(lambda chunk: self.buckets[seq].run(None, chunk)[0], part, self.batch))
                for seq, rows, part in route(self.feeds, sorted(self.buckets))]

    def ordered(self) -> np.ndarray:
        parts = self.run()
        out = np.zeros((self.n, parts[0][1].shape[1]), np.float32)
        for rows, y in parts:
            out[rows] = y
        return out


def baseline_sessions(manifest: dict, open_session) -> tuple[dict, dict]:
    """name -> session for the dense baselines, and what each one is (fusions applied)."""
    from compressor.measure.baselines import dense_dynamic, dense_fused, dense_fused_int8
    from compressor.measure.baselines import dense_export

    fused, fusion = dense_fused(manifest)
    sessions = {"static": open_session(dense_export(manifest)), "dynamic": open_session(dense_dynamic(manifest)),
                "fused": open_session(fused), "fused_int8": open_session(dense_fused_int8(manifest))}
    about = {"static": {}, "dynamic": {}, "fused": {"fusion": fusion}, "fused_int8": {"fusion": fusion, "quantize": "int8-dynamic per channel"}}
    return sessions, about


def time_distribution(path: Path, manifest: dict, samples: list, sessions: dict, repeats: int, warmup: int,
                      buckets: dict | None = None) -> dict:
    """Median ms of every session over one distribution, interleaved; static sessions get padded batches. With
    `buckets` (seq_len -> session of the artifact's bucket graphs), "compressed" is timed routed, as the runtime runs."""
    from compressor.measure.timing import time_interleaved

    feeds = _preprocess(path, manifest, samples)
    b = manifest["shapes"]["batch"]
    static, by_length = static_batches(feeds, b), length_batches(feeds, b)
    runners = {n: Batches(s, by_length if n in ("dynamic", "fused", "fused_int8") else static) for n, s in sessions.items()}
    reference = Batches(sessions["static"], static[:1]).run()[0]
    cosine = {n: float(cosine_rows(Batches(s, static[:1]).run()[0], reference).mean()) for n, s in sessions.items()}
    routed = None
    if buckets:
        routed = runners["compressed"] = Routed(buckets, feeds, b)
        cosine["compressed"] = float(cosine_rows(routed.ordered()[:b], reference).mean())
    times = time_interleaved(runners, {}, repeats, warmup)
    row = {"ms": {n: statistics.median(t) for n, t in times.items()}, "cosine_to_dense": cosine}
    if routed is not None:
        row["bucket_texts"] = {str(seq): n for seq, n in routed.counts.items()}
        row["padded_tokens_artifact"] = routed.padded_tokens
    if "attention_mask" in feeds:
        real = feeds["attention_mask"].sum(1)
        row.update(real_tokens_mean=float(real.mean()), real_tokens_max=int(real.max()),
                   compiled_tokens=int(feeds["attention_mask"].shape[1]),
                   padded_tokens_dynamic=int(sum(x["attention_mask"].size for x in by_length)))
    return row


def baseline_table(path: Path, manifest: dict, open_session, repeats: int, warmup: int, samples: int, step) -> dict:
    """Per distribution: the artifact's ms, and each baseline's ms, speed-up (baseline / artifact) and cosine."""
    step("exporting the dynamic and fused dense baselines (cached after the first time)")
    sessions, about = baseline_sessions(manifest, open_session)
    sessions = {"compressed": open_session(path / manifest["model_file"]), **sessions}
    buckets = {seq: sessions["compressed"] if file == manifest["model_file"] else open_session(path / file)
               for seq, file in bucket_graphs(manifest)}
    out = {}
    for name, (what, raw) in length_distributions(manifest, samples).items():
        step(f"timing '{name}' ({len(raw)} samples), {repeats} interleaved runs per model")
        row = time_distribution(path, manifest, raw, sessions, repeats, warmup, buckets)
        ours = row["ms"]["compressed"]
        entry = {"data": what, "samples": len(raw), "batch": manifest["shapes"]["batch"], "compressed_ms": ours,
                 "compressed_cosine_to_dense": row["cosine_to_dense"]["compressed"],
                 **{k: v for k, v in row.items() if k not in ("ms", "cosine_to_dense")}}
        entry["baselines"] = {n: {"ms": row["ms"][n], "speedup": row["ms"][n] / ours,
                                  "cosine_to_dense": row["cosine_to_dense"][n], **about[n]} for n in about}
        out[name] = entry
    return out


def baseline_rows(result: dict) -> list[list[str]]:
    """bench_artifact's distributions as table rows for the CLI: distribution, its real tokens, the artifact's ms,
    then the speed-up over each baseline (above 1: the artifact is faster)."""
    rows = []
    for name, d in result.get("distributions", {}).items():
        tokens = f"{d['real_tokens_mean']:.0f} (max {d['real_tokens_max']})" if "real_tokens_mean" in d else "-"
        rows.append([name, tokens, f"{d['compressed_ms']:.1f}",
                     *(f"{d['baselines'][b]['speedup']:.2f}x" for b in ("static", "dynamic", "fused", "fused_int8"))])
    return rows


BASELINE_COLUMNS = ["distribution", "real tokens", "artifact (ms)", "vs static", "vs dynamic", "vs fused", "vs fused INT8"]


def speedup_against(path: Path, against: str, repeats: int, warmup: int, threads: int = 2) -> dict:
    """The artifact against one dense baseline (`static`, `fused` or `fused_int8`), interleaved, on the distribution
    a static artifact is compiled for: text passages that fill its length (`long`), or held-out images."""
    from compressor.measure.baselines import dense_fused, dense_fused_int8
    from compressor.measure.baselines import dense_export

    manifest = read_manifest(path)
    open_session = lambda p: make_session(p, threads=threads)  # noqa: E731
    files = {"static": dense_export(manifest)}
    if against == "fused":
        files["fused"] = dense_fused(manifest)[0]
    elif against == "fused_int8":
        files["fused_int8"] = dense_fused_int8(manifest)
    sessions = {"compressed": open_session(path / manifest["model_file"]), **{n: open_session(f) for n, f in files.items()}}
    distributions = length_distributions(manifest, 2 * manifest["shapes"]["batch"])
    name = "long" if "long" in distributions else "images"
    what, raw = distributions[name]
    row = time_distribution(path, manifest, raw, sessions, repeats, warmup)
    dense, ours = row["ms"][against], row["ms"]["compressed"]
    return {"against": against, "distribution": what, "dense_ms": dense, "compressed_ms": ours, "speedup": dense / ours}
