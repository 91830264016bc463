"""Speech recognition from an artifact (Whisper family), torch-free: log-mel in numpy, three onnxruntime graphs.

encoder.onnx  log-mel (1, 80, 3000) -> hidden states of the (merged) audio tokens and their frame sizes
cross_kv.onnx hidden -> each decoder layer's cross-attention keys/values, once per clip
decoder.onnx  token ids + frame sizes + cross keys/values + past -> logits + present (one graph for the prefix and
              every next token; slot 0 of the past is a dummy that the graph always masks)

Greedy decoding with Whisper's forced prefix <|startoftranscript|><|en|><|transcribe|><|notimestamps|> and its
suppression rules (the token lists are in the manifest).
"""

from __future__ import annotations

import numpy as np

from .artifact import REBUILD
from .errors import FeedError, FeedTypeError, RuntimeArtifactError
from .model import CompiledModel


def log_mel(waveform: np.ndarray, mel_filters: np.ndarray, n_fft: int = 400, hop: int = 160,
            num_frames: int = 3000) -> np.ndarray:
    """Whisper's features (80, 3000) for 16 kHz mono audio, as transformers' WhisperFeatureExtractor computes them:
    pad or cut to 30 s, centred STFT (reflect padding, periodic Hann window), power spectrum through the mel filters
    (`mel_filters` (n_fft // 2 + 1, mels)), log10, floor at max - 8, then (x + 4) / 4."""
    samples = num_frames * hop
    audio = np.zeros(samples, np.float32)
    audio[: min(len(waveform), samples)] = waveform[:samples]
    padded = np.pad(audio, n_fft // 2, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop]  # (num_frames + 1, n_fft)
    window = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)).astype(np.float64)
    power = np.abs(np.fft.rfft(frames.astype(np.float64) * window, axis=-1)) ** 2
    mel = np.log10(np.maximum(mel_filters.T.astype(np.float64) @ power.T, 1e-10))[:, :-1]
    mel = np.maximum(mel, mel.max() - 8.0)
    return ((mel + 4.0) / 4.0).astype(np.float32)


def check_waveform(waveform, sampling_rate: int) -> np.ndarray:
    if not isinstance(waveform, np.ndarray):
        raise FeedTypeError(f"transcribe() takes a numpy waveform (float32, {sampling_rate} Hz mono), got {type(waveform).__name__}")
    if waveform.ndim != 1 or waveform.size == 0:
        raise FeedError(f"transcribe() takes one mono waveform shaped (samples,), got shape {list(waveform.shape)}")
    if not np.issubdtype(waveform.dtype, np.floating):
        raise FeedTypeError(f"transcribe() takes float samples in [-1, 1], got {waveform.dtype}")
    if not np.isfinite(waveform).all():
        raise FeedError("transcribe() got a waveform with NaN or infinite samples")
    return waveform.astype(np.float32)


class SpeechModel(CompiledModel):
    def __init__(self, folder, manifest, providers=None, threads=None, allow_fallback=False, *, strict=False):
        super().__init__(folder, manifest, providers, threads, allow_fallback, strict=strict)
        sp = manifest["speech"]
        self.cross_kv = self._session(sp["cross_kv_file"], "speech.cross_kv_file", providers, threads, allow_fallback)
        self.decoder = self._session(sp["decoder_file"], "speech.decoder_file", providers, threads, allow_fallback)
        self.mel_filters = self._mel_filters(sp["mel_filters_file"])
        self.num_layers, self.heads, self.head_dim = sp["decoder_layers"], sp["heads"], sp["head_dim"]
        self.prefix, self.eot, self.max_positions = list(sp["prefix_ids"]), int(sp["eot_id"]), int(sp["max_target_positions"])
        self.suppress, self.begin_suppress = list(sp["suppress_ids"]), list(sp["begin_suppress_ids"])
        self.sampling_rate = int(self._pre["sampling_rate"])
        vocab = next((o.shape[-1] for o in self.decoder.get_outputs() if o.name == "logits"), None)
        ids = self.prefix + self.suppress + self.begin_suppress + [self.eot]
        if strict and isinstance(vocab, int) and max(ids) >= vocab:
            raise RuntimeArtifactError(f"manifest.json 'speech' names token id {max(ids)}, beyond the decoder's "
                                       f"vocabulary of {vocab}; {REBUILD}")

    def _mel_filters(self, name: str) -> np.ndarray:
        """The stored filterbank (n_fft // 2 + 1, mels): a plain .npy array (never a pickle) of that shape."""
        try:
            mel = np.load(self._file(name, "speech.mel_filters_file"), allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise RuntimeArtifactError(f"the mel filterbank '{name}' cannot be read as a numpy array "
                                       f"({' '.join(str(e).split())}); {REBUILD}") from None
        bins = int(self._pre["n_fft"]) // 2 + 1
        if mel.ndim != 2 or mel.shape[0] != bins or not np.issubdtype(mel.dtype, np.floating):
            raise RuntimeArtifactError(f"the mel filterbank '{name}' is {mel.dtype} {list(mel.shape)}; expected floats "
                                       f"shaped [{bins}, mels] for n_fft {self._pre['n_fft']}; {REBUILD}")
        return mel

    def features(self, waveform: np.ndarray) -> np.ndarray:
        """The encoder's input (1, mels, frames) for one waveform."""
        wave = check_waveform(waveform, self.sampling_rate)
        pre = self._pre
        return log_mel(wave, self.mel_filters, pre["n_fft"], pre["hop_length"], pre["num_frames"])[None]

    def encode_audio(self, waveform: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(hidden (1, N', C), frame sizes (1, N')): what the decoder attends to."""
        out = self.run({self.manifest["inputs"][0]["name"]: self.features(waveform)})
        return out["hidden"], out["frame_sizes"]

    def transcribe_ids(self, waveform: np.ndarray, max_new_tokens: int = 96, proportional: bool = True) -> list[int]:
        """Greedy token ids after the forced prefix, end of text excluded. `proportional=False` hands the decoder
        sizes of one, so cross-attention weighs a merged frame like any other (the ablation benchmarks measure)."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise FeedTypeError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        max_new_tokens = min(max_new_tokens, self.max_positions - len(self.prefix))
        hidden, sizes = self.encode_audio(waveform)
        cross = self.cross_kv.run(None, {"hidden": hidden})
        feeds = {"frame_sizes": sizes if proportional else np.ones_like(sizes)}
        for i in range(self.num_layers):
            feeds[f"cross.{i}.key"], feeds[f"cross.{i}.value"] = cross[2 * i], cross[2 * i + 1]
            for kind in ("key", "value"):
                feeds[f"past_key_values.{i}.{kind}"] = np.zeros((1, self.heads, 1, self.head_dim), np.float32)
        ids, out = np.array([self.prefix], np.int64), []
        names = ["logits"] + [f"present.{i}.{k}" for i in range(self.num_layers) for k in ("key", "value")]
        for step in range(max_new_tokens):
            logits, *present = self.decoder.run(names, {"input_ids": ids, **feeds})
            last = logits[0, -1].copy()
            last[self.suppress] = -np.inf
            if step == 0:
                last[self.begin_suppress] = -np.inf
            token = int(np.argmax(last))
            if token == self.eot:
                break
            out.append(token)
            ids = np.array([[token]], np.int64)
            for i in range(self.num_layers):
                feeds[f"past_key_values.{i}.key"], feeds[f"past_key_values.{i}.value"] = present[2 * i], present[2 * i + 1]
        return out

    def transcribe(self, waveform: np.ndarray, max_new_tokens: int = 96) -> str:
        """The English transcript of up to 30 s of 16 kHz mono audio (float samples in [-1, 1]); longer audio is cut."""
        return self.tokenizer.decode(self.transcribe_ids(waveform, max_new_tokens), skip_special_tokens=True).strip()
