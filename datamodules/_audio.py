"""What the audio datamodules share: reading a sound file to mono float32 at one sample rate, and batching clips.

Batches carry audio as ``{"waveform": float32 [B, S], "lengths": long [B]}`` (``docs/ARCHITECTURE.md``): clips
padded with zeros after their end to the longest in the batch, ``lengths`` their real lengths in samples, the input
of :class:`~zoo.encoders.SpectrogramAudioEncoder`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from zoo.errors import DataError


def read_audio(path: str | Path, *, sample_rate: int, key: str = "file") -> np.ndarray:
    """The sound in ``path`` as mono float32 ``[S]`` at ``sample_rate`` Hz.

    Decoded by libsndfile (``soundfile``: WAV in every PCM and float encoding, FLAC, OGG/Vorbis, MP3 and more);
    channels are averaged, and another sample rate is resampled with ``torchaudio.functional.resample`` (windowed
    sinc). Integer encodings come back scaled to ``[-1, 1)``.

    Raises:
        DataError: the file is missing, is not a sound file libsndfile can decode (a corrupt or truncated header),
            holds no samples, or holds NaN or infinite samples, or the package ``soundfile`` is missing; the message
            names ``key`` or the file.
    """
    path = Path(path).expanduser()
    try:
        import soundfile
    except ImportError:  # a dependency of the package; libsndfile comes inside its wheel
        raise DataError(f"{path}: reading sound files needs the package soundfile (pip install soundfile)") from None
    if not path.is_file():
        raise DataError(f"{key}={str(path)!r}: no such file")
    try:
        samples, rate = soundfile.read(path, dtype="float32", always_2d=True)  # [S, channels]
    except (soundfile.SoundFileError, RuntimeError, TypeError, ValueError) as err:
        raise DataError(f"{path}: not a readable sound file ({err})") from None
    if samples.shape[0] == 0:
        raise DataError(f"{path}: holds no samples")
    if not np.isfinite(samples).all():
        raise DataError(f"{path}: holds NaN or infinite samples")
    mono = samples.mean(axis=1, dtype=np.float32) if samples.shape[1] > 1 else samples[:, 0]
    if rate != sample_rate:
        import torchaudio.functional

        mono = torchaudio.functional.resample(torch.from_numpy(np.ascontiguousarray(mono)), rate, sample_rate).numpy()
    return np.ascontiguousarray(mono, dtype=np.float32)


def pad_clips(clips: Sequence[np.ndarray | Tensor]) -> dict[str, Tensor]:
    """1-D clips -> ``{"waveform": float32 [B, S], "lengths": long [B]}``, zero-padded after each clip's end to the
    longest one (``S``)."""
    if not clips:
        raise ValueError("pad_clips: no clips")
    lengths = [int(clip.shape[0]) for clip in clips]
    waveform = torch.zeros(len(clips), max(lengths), dtype=torch.float32)
    for row, clip, length in zip(waveform, clips, lengths, strict=True):
        row[:length] = torch.as_tensor(clip, dtype=torch.float32)
    return {"waveform": waveform, "lengths": torch.tensor(lengths, dtype=torch.long)}


__all__ = ["pad_clips", "read_audio"]
