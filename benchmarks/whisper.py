"""Whisper base with token merging over audio frames: word error rate and encoder speed, dense vs merged.

Real weights (example:whisper-base), real English sentences (Lee corpus) spoken by eSpeak NG (the only speech we
can produce offline; see compressor/sources/speech.py). For each ToMe setting (r frames merged per encoder layer,
of 1500) the artifact is exported, and each clip is transcribed torch-free with onnxruntime (greedy). WER is against
the reference sentences and against the dense transcripts; as an ablation, also with the decoder's cross-attention
ignoring the frame sizes (no log(size) in its logits). Encoder latency (the encoder graph alone, and PyTorch's
encoder program) is timed interleaved in one run. Frames: of the 1500 input frames (20 ms each) how many carry
speech and how many are the silence Whisper pads to 30 s, and how many output tokens each kind ends up in.

    python benchmarks/whisper.py --out benchmarks/whisper.json [--clips 24] [--r 100,150,200] [--threads 2]
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compressor.measure.timing import time_interleaved  # noqa: E402
from compressor.lower.speech import write_speech_folder  # noqa: E402
from compressor.program.encoder import EncoderProgram, TokenPlan  # noqa: E402
from compressor.program.speech import SpeechEncoderProgram  # noqa: E402
from compressor.runtime import load  # noqa: E402
from compressor.sources.source import load_source  # noqa: E402
from compressor.sources.speech import speech_clips, word_error_rate  # noqa: E402

SAMPLES_PER_TOKEN = 320  # conv2's stride 2 over a 160-sample hop: one encoder frame is 20 ms


def frame_split(adapter, plan: TokenPlan, features: np.ndarray, speech_frames: int) -> dict:
    """Output tokens that hold any speech frame vs only padding frames (which input frames each token holds is
    tracked through the merges)."""
    with torch.no_grad():
        enc = EncoderProgram(adapter, plan).encode(torch.from_numpy(features), track_groups=plan.active)
    if enc.groups is None:
        return {"speech_tokens": speech_frames, "padding_tokens": enc.hidden.shape[1] - speech_frames}
    holds_speech = (enc.groups[0][:, :speech_frames].sum(-1) > 0)
    return {"speech_tokens": int(holds_speech.sum()), "padding_tokens": int((~holds_speech).sum())}


def schedule(text: str, layers: int) -> list[int]:
    """'150' -> 150 in every layer; '600/300/100/50/25/0' -> one value per layer."""
    values = [int(v) for v in text.split("/")]
    return values * layers if len(values) == 1 else values


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/whisper.json")
    ap.add_argument("--clips", type=int, default=24)
    ap.add_argument("--r", default="100,150,200,600/300/100/50/25/0",
                    help="ToMe settings, comma-separated: r frames merged in every encoder layer, or a/b/... per layer")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--frame-clips", type=int, default=6, help="clips whose merges are traced to speech vs padding")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    adapter, info = load_source("example:whisper-base")
    adapter.model.eval()
    settings = {"dense": TokenPlan()} | {f"tome r={r}": TokenPlan(merges=schedule(r, len(adapter.layers))) for r in args.r.split(",")}
    clips = speech_clips(args.clips)
    scratch = Path(tempfile.mkdtemp(prefix="whisper-bench-"))
    atexit.register(shutil.rmtree, scratch, True)  # five Whisper artifacts: do not leave them in /tmp
    models = {}
    for name, plan in settings.items():
        t = time.time()
        folder = scratch / name.replace(" ", "_").replace("=", "").replace("/", "-")
        write_speech_folder(adapter, plan, folder, info.to_json(), [])
        models[name] = load(folder, threads=args.threads)
        print(f"exported {name} in {time.time() - t:.0f}s", flush=True)
    refs = [text for text, _ in clips]
    texts = {n: [] for n in settings}
    decode_s = {n: 0.0 for n in settings}
    for i, (_, wave) in enumerate(clips):
        for n, m in models.items():
            t = time.perf_counter()
            texts[n].append(m.transcribe(wave, 96))
            decode_s[n] += time.perf_counter() - t
        print(f"clip {i + 1}/{len(clips)}: {texts['dense'][-1]!r}", flush=True)
    # ablation: the same merged encoders, the decoder's cross-attention without log(size)
    flat = {n: [m.tokenizer.decode(m.transcribe_ids(w, 96, proportional=False), skip_special_tokens=True).strip()
                for _, w in clips] for n, m in models.items() if settings[n].active}
    features = models["dense"].features(clips[0][1])
    feeds = {"input_features": features}
    enc_ms = time_interleaved({n: m.session for n, m in models.items()}, feeds, args.repeats, 2)
    pt_ms = {n: [] for n in settings}
    programs = {n: SpeechEncoderProgram(adapter, p).eval() for n, p in settings.items()}
    x = torch.from_numpy(features)
    with torch.no_grad():
        for n in programs:
            programs[n](x)
        for i in range(max(3, args.repeats // 2)):
            for n in (list(programs) if i % 2 == 0 else list(programs)[::-1]):
                t = time.perf_counter()
                programs[n](x)
                pt_ms[n].append((time.perf_counter() - t) * 1000)
    speech_frames = [min(1500, -(-len(w) // SAMPLES_PER_TOKEN)) for _, w in clips]
    rows = []
    for n, plan in settings.items():
        split = [frame_split(adapter, plan, models["dense"].features(w), s)
                 for (_, w), s in zip(clips[: args.frame_clips], speech_frames)]
        row = {
            "setting": n, "merges": plan.merges or [0] * len(adapter.layers),
            "tokens_out": models[n].manifest["outputs"][0]["shape"][1],
            "wer": word_error_rate(refs, texts[n]), "wer_vs_dense": word_error_rate(texts["dense"], texts[n]),
            "identical_to_dense": sum(a == b for a, b in zip(texts["dense"], texts[n])),
            "wer_without_size_in_cross_attention": word_error_rate(refs, flat[n]) if n in flat else None,
            "ort_encoder_ms": statistics.median(enc_ms[n]), "torch_encoder_ms": statistics.median(pt_ms[n]),
            "transcribe_s_per_clip": decode_s[n] / len(clips),
            "speech_frames_mean": float(np.mean(speech_frames[: args.frame_clips])),
            "speech_tokens_mean": float(np.mean([s["speech_tokens"] for s in split])),
            "padding_tokens_mean": float(np.mean([s["padding_tokens"] for s in split])),
        }
        rows.append(row)
    dense = rows[0]
    for row in rows:
        row["ort_encoder_speedup"] = dense["ort_encoder_ms"] / row["ort_encoder_ms"]
        row["torch_encoder_speedup"] = dense["torch_encoder_ms"] / row["torch_encoder_ms"]
        row["transcribe_speedup"] = dense["transcribe_s_per_clip"] / row["transcribe_s_per_clip"]
    result = {"model": "example:whisper-base", "clips": len(clips), "threads": args.threads, "repeats": args.repeats,
              "speech_seconds_mean": float(np.mean([len(w) / 16000 for _, w in clips])),
              "load_average": os.getloadavg()[0], "rows": rows,
              "transcripts": {n: texts[n] for n in settings} | {"reference": refs}}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\n{len(clips)} clips, mean {result['speech_seconds_mean']:.1f} s of speech in a 30 s window; "
          f"{args.threads} threads; speech/padding tokens traced on {args.frame_clips} clips")
    print(f"{'setting':24} {'tokens':>6} {'WER':>6} {'vs dense':>8} {'same':>5} {'ORT enc ms':>10} {'x':>5} "
          f"{'torch enc ms':>12} {'x':>5} {'clip s':>6} {'x':>5} {'speech/pad tokens':>18}")
    for r in rows:
        print(f"{r['setting']:24} {r['tokens_out']:6d} {r['wer']:6.3f} {r['wer_vs_dense']:8.3f} {r['identical_to_dense']:5d} "
              f"{r['ort_encoder_ms']:10.1f} {r['ort_encoder_speedup']:5.2f} {r['torch_encoder_ms']:12.1f} "
              f"{r['torch_encoder_speedup']:5.2f} {r['transcribe_s_per_clip']:6.2f} {r['transcribe_speedup']:5.2f} "
              f"{r['speech_tokens_mean']:8.0f}/{r['padding_tokens_mean']:<8.0f}")
    print("decoder cross-attention without log(size) (ablation), WER: " +
          ", ".join(f"{r['setting']} {r['wer_without_size_in_cross_attention']:.3f}" for r in rows[1:]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
