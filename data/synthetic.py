"""Synthetic speaker data in exactly the HW4 on-disk format, so every part of the harness can be
tested and demonstrated without the multi-GB Kaggle download.

Each speaker is a mean spectral envelope plus its own versions of shared "phoneme" shapes, its own
phoneme usage and speaking rate; each utterance adds a channel curve, a gain offset, slow loudness
modulation and noise. Everything is drawn from one seeded generator, so a seed names a dataset.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data.errors import DataError
from data.files import staging_dir

# Bump when the generator's output changes, so an old folder is not taken for a new one.
GENERATOR_VERSION = 1
MARKER_FILE = "synthetic.json"
TEST_LABELS_FILE = "test_labels.json"  # synthetic-only extra: the answers for testdata.json
TEST_LABELS_CSV = "test_labels.csv"  # the same in the Kaggle submission format, for `predict --labels`
TEST_FRACTION_DIVISOR = 15  # default n_test = labelled utterances // 15 (HW4: 56,666 vs 4,000)

# --- Difficulty constants -------------------------------------------------------------------
# Calibrated on 2 CPU threads for the quickstart study: 40 speakers x 60 utterances, random
# 128-frame crops, 90/10 split, transformer (batch-first, padding mask, masked mean pooling),
# AdamW, batch 32. Validation accuracy measured (seed 0; +-3 points is noise on 240 utterances):
#   d_model 16, lr 1e-4             :  4 % at 300 steps,  6 % at 400   (chance 2.5 %)
#   d_model 32, lr 1e-3             : 33 % at 300 steps, 37 % at 400
#   d_model 64, lr 2e-3             : 47 % at 300 steps, 54 % at 800, 65 % at 1,600
#   d_model 128, lr 1e-3            : 43 % at 300 steps, 64 % at 800, 73 % at 1,600
#   d_model 128, 2 layers, MLP head : 44 % at 300 steps
# and 600 speakers x 20 utterances stays hard: 1-2 % at 400 steps (chance 0.17 %).
# Changing any constant below changes those numbers: re-measure and bump GENERATOR_VERSION.
LEVEL_MEAN = -5.7  # overall mean of the real HW4 log-mel values
SPECTRAL_TILT = 2.0  # shared low-to-high mel slope, +TILT at mel 0 to -TILT at the top
N_PHONEMES = 32  # shared phoneme inventory size
PHONEME_SCALE = 2.2  # spread of the shared phoneme shapes
SILENCE_LEVEL = -4.0  # offset of the silence "phoneme" (index 0), always shared
SPEAKER_ENVELOPE_SCALE = 1.0  # how far speakers' mean envelopes lie apart
SPEAKER_PHONEME_SCALE = 0.9  # how far a speaker's phoneme versions lie from the shared ones
USAGE_CONCENTRATION = 8.0  # Dirichlet concentration of phoneme usage (low = idiosyncratic)
SEGMENT_FRAMES_RANGE = (4.0, 12.0)  # speakers' mean phoneme durations, frames
CHANNEL_SCALE = 0.8  # per-utterance smooth channel (microphone/room) curve
GAIN_SCALE = 1.0  # per-utterance overall level offset
MODULATION_SCALE = 0.8  # slow loudness modulation amplitude
MODULATION_PERIOD_RANGE = (60.0, 300.0)  # frames
NOISE_SCALE = 1.6  # i.i.d. per-cell noise
# Smooth curves over the mel axis are sums of cosines with decaying amplitudes.
ENVELOPE_COSINES = 6
PHONEME_COSINES = 10
COARTICULATION_FRAMES = 3  # moving-average width that blends neighbouring phonemes
LENGTH_BETA = (2.0, 3.0)  # skew of utterance lengths over [min_len, max_len]: many short ones


@dataclass(frozen=True)
class _Speaker:
    """One speaker's voice: what stays fixed across its utterances."""

    phonemes: np.ndarray  # (N_PHONEMES, n_mels): envelope + shared shape + personal deviation
    usage: np.ndarray  # (N_PHONEMES,) probabilities
    segment_frames: float  # mean phoneme duration


def make_synthetic(
    out: Path,
    speakers: int,
    utterances_per_speaker: int,
    seed: int,
    n_mels: int = 40,
    n_test: int | None = None,
    min_len: int = 40,
    max_len: int = 400,
) -> Path:
    """Write a seeded synthetic HW4-format dataset to `out` and return `out`.

    Idempotent: a folder already generated with the same arguments is returned untouched; any
    other non-empty folder is refused. The folder appears only once complete (built beside it,
    then renamed), so an interrupted run never looks finished.
    """
    _check_int("speakers", speakers, 2)
    _check_int("utterances_per_speaker", utterances_per_speaker, 2)
    _check_int("seed", seed, 0)
    _check_int("n_mels", n_mels, 1)
    _check_int("min_len", min_len, 1)
    _check_int("max_len", max_len, min_len, f"an integer >= min_len ({min_len})")
    if n_test is None:
        n_test = max(1, speakers * utterances_per_speaker // TEST_FRACTION_DIVISOR)
    _check_int("n_test", n_test, 0)
    args = {
        "generator_version": GENERATOR_VERSION, "speakers": speakers,
        "utterances_per_speaker": utterances_per_speaker, "seed": seed, "n_mels": n_mels,
        "n_test": n_test, "min_len": min_len, "max_len": max_len,
    }
    out = Path(out)
    if _already_generated(out, args):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(f".{out.name}.partial-", out.parent)
    try:
        _write_dataset(tmp, args)
        (tmp / MARKER_FILE).write_text(json.dumps(args, indent=2) + "\n")
        if out.exists():
            out.rmdir()  # empty, checked above; a rival writer filling it makes this fail loudly
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _check_int(name: str, value: object, minimum: int, valid: str | None = None) -> None:
    """Raise DataError unless `value` is an int >= minimum."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DataError(f"make_synthetic: {name}={value!r} is invalid; "
                        f"use {valid or f'an integer >= {minimum}'}")


def _already_generated(out: Path, args: dict) -> bool:
    """True if `out` holds a finished dataset made with `args`; False if absent or empty."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder; pass a new or empty folder")
    if not any(out.iterdir()):
        return False
    marker = out / MARKER_FILE
    try:
        found = json.loads(marker.read_text())
    except (OSError, ValueError):
        found = None
    if found != args:
        raise DataError(f"{out}: folder is not empty and is not a synthetic dataset made with "
                        f"these arguments ({marker.name} differs or is missing); "
                        "pass a new or empty folder")
    return True


def _write_dataset(folder: Path, args: dict) -> None:
    """Generate every utterance and write the tensors and the four JSON files into `folder`."""
    rng = np.random.default_rng(args["seed"])
    n_mels, n_speakers = args["n_mels"], args["speakers"]
    speaker_ids = _speaker_ids(rng, n_speakers)
    test_counts = np.bincount(rng.integers(0, n_speakers, args["n_test"]), minlength=n_speakers)
    phonemes = _shared_phonemes(rng, n_mels)
    speakers: dict[str, list[dict]] = {}
    test: list[tuple[dict, str]] = []
    for speaker_id, n_extra in zip(speaker_ids, test_counts, strict=True):
        voice = _make_speaker(rng, phonemes)
        n_utts = args["utterances_per_speaker"] + int(n_extra)
        lengths = _lengths(rng, n_utts, args["min_len"], args["max_len"])
        entries = [_save(folder, rng, mels) for mels in _utterances(rng, voice, lengths)]
        speakers[speaker_id] = entries[: args["utterances_per_speaker"]]
        test += [(entry, speaker_id) for entry in entries[args["utterances_per_speaker"]:]]
    test = [test[i] for i in rng.permutation(len(test))]
    _write_json(folder / "metadata.json", {"n_mels": n_mels, "speakers": speakers})
    _write_json(folder / "mapping.json", {
        "speaker2id": {s: i for i, s in enumerate(speaker_ids)},
        "id2speaker": {str(i): s for i, s in enumerate(speaker_ids)},
    })
    _write_json(folder / "testdata.json", {"n_mels": n_mels, "utterances": [e for e, _ in test]})
    _write_json(folder / TEST_LABELS_FILE, {e["feature_path"]: s for e, s in test})
    (folder / TEST_LABELS_CSV).write_text("Id,Category\n" + "".join(f"{e['feature_path']},{s}\n" for e, s in test))


def _speaker_ids(rng: np.random.Generator, n: int) -> list[str]:
    """Distinct sorted VoxCeleb-style ids ("id00464"), drawn from a space 10x the count."""
    numbers = rng.choice(max(10_000, 10 * n), size=n, replace=False)
    return [f"id{k:05d}" for k in sorted(numbers)]


def _smooth_curves(rng: np.random.Generator, count: int, n_mels: int, n_cosines: int,
                   scale: float) -> np.ndarray:
    """(count, n_mels) random curves smooth over the mel axis, each of standard deviation ~scale."""
    position = np.linspace(0.0, 1.0, n_mels)
    k = np.arange(1, n_cosines + 1)
    basis = np.cos(np.pi * k[:, None] * position[None, :])  # (n_cosines, n_mels)
    weights = rng.standard_normal((count, n_cosines)) / k  # 1/k: low frequencies dominate
    weights *= scale * np.sqrt(2.0 / np.sum(1.0 / k**2))
    return weights @ basis


def _shared_phonemes(rng: np.random.Generator, n_mels: int) -> np.ndarray:
    """(N_PHONEMES, n_mels) shapes every speaker uses; index 0 is a flat, quiet silence."""
    shapes = _smooth_curves(rng, N_PHONEMES, n_mels, PHONEME_COSINES, PHONEME_SCALE)
    shapes[0] = SILENCE_LEVEL
    return shapes


def _make_speaker(rng: np.random.Generator, shared: np.ndarray) -> _Speaker:
    """Draw one voice: envelope, personal phoneme versions, usage and speaking rate."""
    n_mels = shared.shape[1]
    tilt = np.linspace(SPECTRAL_TILT, -SPECTRAL_TILT, n_mels)
    envelope = LEVEL_MEAN + tilt + _smooth_curves(
        rng, 1, n_mels, ENVELOPE_COSINES, SPEAKER_ENVELOPE_SCALE)[0]
    personal = _smooth_curves(rng, N_PHONEMES, n_mels, PHONEME_COSINES, SPEAKER_PHONEME_SCALE)
    personal[0] = 0.0
    usage = rng.dirichlet(np.full(N_PHONEMES, USAGE_CONCENTRATION))
    return _Speaker(phonemes=envelope + shared + personal, usage=usage,
                    segment_frames=float(rng.uniform(*SEGMENT_FRAMES_RANGE)))


def _lengths(rng: np.random.Generator, n: int, min_len: int, max_len: int) -> np.ndarray:
    """n utterance lengths in [min_len, max_len], skewed short (a quarter below 128 by default)."""
    fraction = rng.beta(*LENGTH_BETA, size=n)
    return min_len + np.rint(fraction * (max_len - min_len)).astype(np.int64)


def _utterances(rng: np.random.Generator, voice: _Speaker, lengths: np.ndarray
                ) -> list[np.ndarray]:
    """All of one speaker's utterances, generated as one concatenated array then split."""
    total, n_mels = int(lengths.sum()), voice.phonemes.shape[1]
    frames = voice.phonemes[_phoneme_track(rng, voice, total)]  # (total, n_mels)
    frames = _blend(frames, COARTICULATION_FRAMES)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    owner = np.repeat(np.arange(len(lengths)), lengths)  # utterance index of each frame
    local_t = np.arange(total) - starts[owner]
    channel = _smooth_curves(rng, len(lengths), n_mels, ENVELOPE_COSINES, CHANNEL_SCALE)
    gain = rng.normal(0.0, GAIN_SCALE, len(lengths))
    period = rng.uniform(*MODULATION_PERIOD_RANGE, len(lengths))
    phase = rng.uniform(0.0, 2 * np.pi, len(lengths))
    loudness = MODULATION_SCALE * np.sin(2 * np.pi * local_t / period[owner] + phase[owner])
    frames += channel[owner] + (gain[owner] + loudness)[:, None]
    frames += rng.normal(0.0, NOISE_SCALE, frames.shape)
    return np.split(frames.astype(np.float32), starts[1:])


def _phoneme_track(rng: np.random.Generator, voice: _Speaker, total: int) -> np.ndarray:
    """Phoneme index of each of `total` frames: segments drawn from the speaker's usage/rate."""
    n_segments = int(2 * total / voice.segment_frames) + 8
    durations = 1 + rng.poisson(voice.segment_frames - 1, n_segments)
    while durations.sum() < total:  # rare: extend until the track covers every frame
        durations = np.concatenate([durations, 1 + rng.poisson(voice.segment_frames - 1, 8)])
    labels = rng.choice(N_PHONEMES, size=len(durations), p=voice.usage)
    return np.repeat(labels, durations)[:total]


def _blend(frames: np.ndarray, width: int) -> np.ndarray:
    """Moving average over time (edges use the frames available): smooth phoneme transitions."""
    padded = np.concatenate([np.zeros((1, frames.shape[1])), np.cumsum(frames, axis=0)])
    t = np.arange(len(frames))
    lo = np.maximum(t - width // 2, 0)
    hi = np.minimum(t + width - width // 2, len(frames))
    return (padded[hi] - padded[lo]) / (hi - lo)[:, None]


def _save(folder: Path, rng: np.random.Generator, mels: np.ndarray) -> dict:
    """torch.save one (mel_len, n_mels) float32 tensor under a seeded uttr-<32 hex>.pt name."""
    name = f"uttr-{rng.bytes(16).hex()}.pt"
    torch.save(torch.from_numpy(mels), folder / name)
    return {"feature_path": name, "mel_len": int(mels.shape[0])}


def _write_json(path: Path, obj: dict) -> None:
    """Write `obj` as compact JSON (key order as built, so output is deterministic)."""
    path.write_text(json.dumps(obj))
