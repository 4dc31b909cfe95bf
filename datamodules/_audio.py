"""What the audio datamodules share: reading a sound file to mono float32 at one sample rate, and batching clips.

Batches carry audio as ``{"waveform": float32 [B, S], "lengths": long [B]}`` (``docs/ARCHITECTURE.md``): clips
padded with zeros after their end to the longest in the batch, ``lengths`` their real lengths in samples, the input
of :class:`~zoo.encoders.SpectrogramAudioEncoder`.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from zoo.errors import DataError

#: data lengths a writer that cannot seek back leaves in the header of a whole file (ffmpeg writing to a pipe, and AU's
#: "unknown size": 0xFFFFFFFF; SoX: 0x7FFFF000): libsndfile reads such a file to its end, and it is not truncated.
_UNKNOWN_LENGTHS = (0xFFFFFFFF, 0x7FFFF000)


def read_audio(path: str | Path, *, sample_rate: int, key: str = "file") -> np.ndarray:
    """The sound in ``path`` as mono float32 ``[S]`` at ``sample_rate`` Hz.

    Decoded by libsndfile (``soundfile``: WAV in every PCM and float encoding, FLAC, OGG/Vorbis, MP3 and more);
    channels are averaged, and another sample rate is resampled with ``torchaudio.functional.resample`` (windowed
    sinc). Integer encodings come back scaled to ``[-1, 1)``.

    Raises:
        DataError: the file is missing, is not a sound file libsndfile can decode (a corrupt or truncated header),
            is a WAV, AIFF or AU file cut short of the sound data its header announces (an MP3 file, of the frames its
            Xing, Info or VBRI header announces), holds no samples, or holds
            NaN or infinite samples, or the package ``soundfile`` is missing; the message names ``key`` or the file.
    """
    path = Path(path).expanduser()
    try:
        import soundfile
    except ImportError:  # a dependency of the package; libsndfile comes inside its wheel
        raise DataError(f"{path}: reading sound files needs the package soundfile (pip install soundfile)") from None
    if not path.is_file():
        raise DataError(f"{key}={str(path)!r}: no such file")
    try:
        with soundfile.SoundFile(path) as sound:
            announced, rate, container = sound.frames, sound.samplerate, sound.format
            samples = sound.read(dtype="float32", always_2d=True)  # [S, channels]
    except (soundfile.SoundFileError, RuntimeError, TypeError, ValueError) as err:
        raise DataError(f"{path}: not a readable sound file ({err})") from None
    # libsndfile decodes a cut file's remaining frames and reports those as the file's length, without a word
    lengths = _sound_data_lengths(path)
    if lengths is not None and lengths[0] > lengths[1]:
        raise DataError(
            f"{path}: not a readable sound file (truncated: its header announces {lengths[0]} bytes of sound data, "
            f"the file holds {lengths[1]})"
        )
    # an MP3's length is known only from a Xing, Info or VBRI header (LAME writes one); without it libsndfile's frame
    # count is an estimate from the file's size, and a cut at a frame boundary cannot be told from a shorter sound
    if container == "MP3" and samples.shape[0] < announced and _mp3_announces_length(path):
        raise DataError(
            f"{path}: not a readable sound file (truncated: its header announces {announced} frames, "
            f"{samples.shape[0]} were decoded)"
        )
    if samples.shape[0] == 0:
        raise DataError(f"{path}: holds no samples")
    if not np.isfinite(samples).all():
        raise DataError(f"{path}: holds NaN or infinite samples")
    mono = samples.mean(axis=1, dtype=np.float32) if samples.shape[1] > 1 else samples[:, 0]
    if rate != sample_rate:
        import torchaudio.functional

        mono = torchaudio.functional.resample(torch.from_numpy(np.ascontiguousarray(mono)), rate, sample_rate).numpy()
    return np.ascontiguousarray(mono, dtype=np.float32)


def _sound_data_lengths(path: Path) -> tuple[int, int] | None:
    """``(announced, held)``: the bytes of sound data the header of a WAV (RIFF, RIFX, RF64), AIFF/AIFC or AU file
    announces, and the bytes the file holds from the data's start to its end; ``None`` for another format or a header
    that leaves the length open. Reads the headers only."""
    with open(path, "rb") as f:
        head = f.read(12)
        end = f.seek(0, os.SEEK_END)
        magic, form = head[:4], head[8:12]
        if magic in (b".snd", b"dns.") and len(head) == 12:  # AU, big- or little-endian
            offset, announced = struct.unpack(">II" if magic == b".snd" else "<II", head[4:])
            return None if announced in _UNKNOWN_LENGTHS else (announced, end - offset)
        if magic in (b"RIFF", b"RIFX", b"RF64") and form == b"WAVE":
            order, data_id = (">" if magic == b"RIFX" else "<"), b"data"
        elif magic == b"FORM" and form in (b"AIFF", b"AIFC"):
            order, data_id = ">", b"SSND"
        else:
            return None
        position, ds64_length = 12, None
        while position + 8 <= end:
            f.seek(position)
            chunk_id, size = struct.unpack(f"{order}4sI", f.read(8))
            if chunk_id == b"ds64" and size >= 16 and position + 24 <= end:  # RF64's 64-bit lengths: RIFF's, data's
                ds64_length = struct.unpack("<8xQ", f.read(16))[0]
            elif chunk_id == data_id:
                if magic == b"RF64" and size == 0xFFFFFFFF:
                    size = ds64_length
                return None if size is None or size in _UNKNOWN_LENGTHS else (size, end - position - 8)
            position += 8 + size + size % 2  # chunks are padded to an even length
    return None


def _mp3_announces_length(path: Path) -> bool:
    """Whether the MP3 file's first frame holds a Xing, Info or VBRI header (frame and byte counts of the stream),
    after an ID3v2 tag if there is one."""
    with open(path, "rb") as f:
        head = f.read(10)
        start = 0
        if head[:3] == b"ID3" and len(head) == 10:  # ID3v2: a 10-byte header, a 28-bit "syncsafe" size, a footer
            size = (head[6] & 0x7F) << 21 | (head[7] & 0x7F) << 14 | (head[8] & 0x7F) << 7 | head[9] & 0x7F
            start = 10 + size + (10 if head[5] & 0x10 else 0)
        f.seek(start)
        data = f.read(4096)
    sync = next((i for i in range(len(data) - 1) if data[i] == 0xFF and data[i + 1] & 0xE0 == 0xE0), None)
    # the header follows the frame header and side information: at byte 13, 21 or 36 of the frame (Xing, Info), 36
    # (VBRI)
    return sync is not None and any(tag in data[sync : sync + 48] for tag in (b"Xing", b"Info", b"VBRI"))


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
