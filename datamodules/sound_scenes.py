"""Sound Scenes: audio question answering on generated sound scenes, after DAQA (Fayek & Johnson 2020, "Temporal
Reasoning via Audio Question Answering"), small enough for a CPU.

Each clip lasts 2 seconds at 8 kHz and holds one to four sound events, one after another with silence between them,
over faint white noise. An event is one of four kinds (a steady tone, a rising sweep, a falling sweep, a noise
burst; at most one of each kind per clip, so that "the rising sweep" names one event) at one of three pitches (low
around 200-330 Hz, medium 550-850 Hz, high 1,400-2,100 Hz: the tone's frequency, the sweep's geometric centre, the
burst's band centre), lasting 0.25-0.45 s at a random loudness. Six questions are asked about every clip, in four
families (the groups of the task's accuracy):

- ``count``: "How many sounds are there?" (1-4);
- ``exists``: "Is there a rising sweep?" (yes/no; twice, about two different kinds drawn at random);
- ``pitch``: "What is the pitch of the noise burst?" (low/medium/high; about a kind the clip holds);
- ``order``: "What is the first sound?", "... the last sound?", "What comes right after the steady tone?", "What
  comes right before the falling sweep?" (a kind, or "nothing"; twice, two different templates, "after" and "before"
  about a kind the clip holds). The order questions need the encoder to keep time and the fusion to tie a word of
  the question to an event: they are the relational ones.

The scene table is a pure function of ``(num_clips, seed)``, the first ``k`` clips the same for any ``num_clips >=
k``; the waveforms are rendered from it (half a millisecond a clip) once in ``setup``, into memory, or when fetched
(``prerender: false``): nothing is cached on disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from datamodules._audio import pad_clips
from datamodules._common import SplitLoaders, check_loader_args
from zoo.errors import ConfigError

SAMPLE_RATE = 8000
CLIP_SAMPLES = 2 * SAMPLE_RATE
MAX_EVENTS = 4
KINDS = ("steady tone", "rising sweep", "falling sweep", "noise burst")
PITCHES = ("low", "medium", "high")
#: the range of each pitch's centre frequency in Hz; a sweep spans a factor ``SWEEP_SPAN`` below and above it.
PITCH_BANDS = ((200.0, 330.0), (550.0, 850.0), (1400.0, 2100.0))
SWEEP_SPAN = 1.5
ANSWERS = ("1", "2", "3", "4", "yes", "no", *PITCHES, *KINDS, "nothing")
GROUP_NAMES = ("count", "exists", "pitch", "order")
#: question templates, indexed ``[group][subtype]``; ``{kind}`` is one of ``KINDS``.
TEMPLATES = (
    ("How many sounds are there?",),
    ("Is there a {kind}?",),
    ("What is the pitch of the {kind}?",),
    (
        "What is the first sound?",
        "What is the last sound?",
        "What comes right after the {kind}?",
        "What comes right before the {kind}?",
    ),
)
#: the group of each of a clip's questions.
QUESTION_GROUPS = (0, 1, 1, 2, 3, 3)
QUESTIONS_PER_CLIP = len(QUESTION_GROUPS)

_MIN_EVENT, _MAX_EVENT = 0.25, 0.45  # seconds
_FADE = int(0.01 * SAMPLE_RATE)  # 10 ms raised-cosine onset and release: no clicks
_ANSWER = {a: i for i, a in enumerate(ANSWERS)}


def question_text(group: int, subtype: int, kind: int) -> str:
    """The question of ``group``, ``subtype`` (index into ``TEMPLATES[group]``) about event kind ``kind``."""
    return TEMPLATES[group][subtype].format(kind=KINDS[kind] if kind >= 0 else "")


@dataclass(frozen=True)
class SoundScenes:
    """Generated scenes and their questions; ``N`` clips, events in time order, ``Q = 6`` questions each.

    Attributes:
        num_events: uint8 ``[N]``, 1..4.
        kinds: int8 ``[N, 4]``: index into ``KINDS`` of each event; ``-1`` after the last event.
        pitches: int8 ``[N, 4]``: index into ``PITCHES``; ``-1`` after the last event.
        frequencies: float32 ``[N, 4]``: the event's centre frequency in Hz.
        onsets: int32 ``[N, 4]``: first sample of each event.
        durations: int32 ``[N, 4]``: samples.
        gains: float32 ``[N, 4]``: peak amplitude of each event.
        noise_levels: float32 ``[N]``: standard deviation of the background noise.
        noise_seeds: int64 ``[N]``: seeds of each clip's noise (background and bursts).
        question_group: uint8 ``[N, Q]``: index into ``GROUP_NAMES``.
        question_subtype: uint8 ``[N, Q]``: index into ``TEMPLATES[group]``.
        question_kind: int8 ``[N, Q]``: the event kind the question names; ``-1`` when it names none.
        answers: int64 ``[N, Q]``: index into ``ANSWERS``.
    """

    num_events: np.ndarray
    kinds: np.ndarray
    pitches: np.ndarray
    frequencies: np.ndarray
    onsets: np.ndarray
    durations: np.ndarray
    gains: np.ndarray
    noise_levels: np.ndarray
    noise_seeds: np.ndarray
    question_group: np.ndarray
    question_subtype: np.ndarray
    question_kind: np.ndarray
    answers: np.ndarray

    def __len__(self) -> int:
        return len(self.num_events)


def generate_sound_scenes(num_clips: int, *, seed: int = 0) -> SoundScenes:
    """Draw ``num_clips`` scenes and their questions; a pure function of ``(num_clips, seed)``."""
    rng = np.random.default_rng(seed)
    shape = (num_clips, MAX_EVENTS)
    num_events = np.zeros(num_clips, dtype=np.uint8)
    kinds, pitches = np.full(shape, -1, dtype=np.int8), np.full(shape, -1, dtype=np.int8)
    frequencies, gains = np.zeros(shape, dtype=np.float32), np.zeros(shape, dtype=np.float32)
    onsets, durations = np.zeros(shape, dtype=np.int32), np.zeros(shape, dtype=np.int32)
    noise_levels = np.zeros(num_clips, dtype=np.float32)
    noise_seeds = np.zeros(num_clips, dtype=np.int64)
    q_shape = (num_clips, QUESTIONS_PER_CLIP)
    q_group = np.broadcast_to(np.array(QUESTION_GROUPS, dtype=np.uint8), q_shape).copy()
    q_subtype, q_kind = np.zeros(q_shape, dtype=np.uint8), np.full(q_shape, -1, dtype=np.int8)
    answers = np.zeros(q_shape, dtype=np.int64)
    for n in range(num_clips):
        k = int(rng.integers(1, MAX_EVENTS + 1))
        num_events[n] = k
        kinds[n, :k] = rng.permutation(len(KINDS))[:k]
        pitches[n, :k] = rng.integers(0, len(PITCHES), k)
        low, high = np.array(PITCH_BANDS, dtype=np.float64)[pitches[n, :k]].T
        frequencies[n, :k] = np.exp(rng.uniform(np.log(low), np.log(high)))  # uniform in log-frequency
        lengths = np.round(rng.uniform(_MIN_EVENT, _MAX_EVENT, k) * SAMPLE_RATE).astype(np.int64)
        # the silence left over is split at random into k + 1 gaps: before, between and after the events
        gaps = rng.dirichlet(np.ones(k + 1)) * (CLIP_SAMPLES - lengths.sum())
        starts = np.floor(np.cumsum(gaps[:k]) + np.concatenate([[0], np.cumsum(lengths)[:-1]])).astype(np.int64)
        onsets[n, :k], durations[n, :k] = starts, lengths
        gains[n, :k] = rng.uniform(0.25, 0.9, k)
        noise_levels[n] = rng.uniform(0.005, 0.03)
        noise_seeds[n] = rng.integers(0, 2**62)
        for q, (group, subtype, kind) in enumerate(_draw_questions(rng, kinds[n, :k])):
            q_subtype[n, q], q_kind[n, q] = subtype, kind
            answers[n, q] = _ANSWER[_answer(group, subtype, kind, kinds[n, :k], pitches[n, :k])]
    return SoundScenes(
        num_events, kinds, pitches, frequencies, onsets, durations, gains, noise_levels, noise_seeds,
        q_group, q_subtype, q_kind, answers,
    )  # fmt: skip


def _draw_questions(rng: np.random.Generator, present: np.ndarray) -> list[tuple[int, int, int]]:
    """``(group, subtype, kind)`` of each question (groups ``QUESTION_GROUPS``) about a clip holding the event kinds
    ``present``: the two ``exists`` questions name two different kinds, the two ``order`` questions have two
    different templates, and ``pitch`` and ``after``/``before`` name a kind the clip holds."""
    exists = rng.choice(len(KINDS), 2, replace=False).tolist()
    order = rng.choice(len(TEMPLATES[3]), 2, replace=False).tolist()
    return [
        (0, 0, -1),
        (1, 0, exists[0]),
        (1, 0, exists[1]),
        (2, 0, int(rng.choice(present))),
        *((3, s, int(rng.choice(present)) if s >= 2 else -1) for s in order),
    ]


def _answer(group: int, subtype: int, kind: int, kinds: np.ndarray, pitches: np.ndarray) -> str:
    """The answer string of a question, from the clip's event kinds and pitches in time order."""
    kinds = kinds.tolist()
    if group == 0:
        return str(len(kinds))
    if group == 1:
        return "yes" if kind in kinds else "no"
    if group == 2:
        return PITCHES[pitches[kinds.index(kind)]]
    if subtype in (0, 1):
        return KINDS[kinds[0] if subtype == 0 else kinds[-1]]
    neighbour = kinds.index(kind) + (1 if subtype == 2 else -1)
    return KINDS[kinds[neighbour]] if 0 <= neighbour < len(kinds) else "nothing"


def render_clip(scenes: SoundScenes, n: int) -> np.ndarray:
    """The waveform of clip ``n``: float32 ``[CLIP_SAMPLES]`` at ``SAMPLE_RATE``, within ``[-1, 1]``."""
    rng = np.random.default_rng(int(scenes.noise_seeds[n]))
    clip = rng.standard_normal(CLIP_SAMPLES).astype(np.float32) * scenes.noise_levels[n]
    for e in range(int(scenes.num_events[n])):
        length, start = int(scenes.durations[n, e]), int(scenes.onsets[n, e])
        event = _event(int(scenes.kinds[n, e]), float(scenes.frequencies[n, e]), length, rng)
        clip[start : start + length] += scenes.gains[n, e] * event
    return np.clip(clip, -1.0, 1.0)


def _event(kind: int, frequency: float, length: int, rng: np.random.Generator) -> np.ndarray:
    """One event of ``length`` samples, peak amplitude about 1, with raised-cosine fades."""
    t = np.arange(length) / SAMPLE_RATE
    phase0 = rng.uniform(0, 2 * np.pi)
    if kind == 0:  # steady tone, with a quiet second harmonic so that it is not a pure sine
        wave = np.sin(2 * np.pi * frequency * t + phase0) + 0.25 * np.sin(4 * np.pi * frequency * t + phase0)
    elif kind in (1, 2):  # exponential sweep from frequency / SWEEP_SPAN to frequency * SWEEP_SPAN, or back
        exponent = np.linspace(-1.0, 1.0, length) * (1 if kind == 1 else -1)
        instantaneous = frequency * SWEEP_SPAN**exponent
        wave = np.sin(2 * np.pi * np.cumsum(instantaneous) / SAMPLE_RATE + phase0)
    else:  # noise burst: white noise kept between frequency / SWEEP_SPAN and frequency * SWEEP_SPAN
        spectrum = np.fft.rfft(rng.standard_normal(length))
        bins = np.fft.rfftfreq(length, 1 / SAMPLE_RATE)
        spectrum[(bins < frequency / SWEEP_SPAN) | (bins > frequency * SWEEP_SPAN)] = 0
        wave = np.fft.irfft(spectrum, length)
        wave *= 0.3 / max(float(wave.std()), 1e-8)  # about the loudness of the tones (peaks near 1)
    envelope = np.ones(length)
    fade = 0.5 - 0.5 * np.cos(np.pi * np.arange(_FADE) / _FADE)
    envelope[:_FADE], envelope[-_FADE:] = fade, fade[::-1]
    wave = wave * envelope
    return (wave / max(float(np.abs(wave).max()), 1e-8)).astype(np.float32)


def render_clips(scenes: SoundScenes) -> np.ndarray:
    """Every clip of ``scenes`` rendered: float16 ``[N, CLIP_SAMPLES]`` (half the memory of float32; the rounding,
    below 1e-3 of a sample's magnitude, is far under the background noise)."""
    waveforms = np.empty((len(scenes), CLIP_SAMPLES), dtype=np.float16)
    for n in range(len(scenes)):
        waveforms[n] = render_clip(scenes, n)
    return waveforms


class SoundScenesDataset(Dataset):
    """The questions about a subset of the clips: item ``i`` is question ``i % 6`` of clip ``clip_indices[i // 6]``,
    as ``{"audio": {"waveform": [S], "lengths": []}, "text": str, "label": long [], "group": long []}``; the
    DataLoader fetches whole batches through :meth:`__getitems__` (``"audio"`` then ``{"waveform": [B, S],
    "lengths": [B]}``, every clip ``CLIP_SAMPLES`` long).

    Clips are rendered when fetched, or read from ``waveforms`` (``[len(scenes), CLIP_SAMPLES]``, every clip of the
    scene table rendered once, e.g. by :func:`render_clips`) when given.
    """

    def __init__(self, scenes: SoundScenes, clip_indices: np.ndarray, *, waveforms: np.ndarray | None = None) -> None:
        self.scenes, self.waveforms = scenes, waveforms
        self.clip_indices = np.asarray(clip_indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.clip_indices) * QUESTIONS_PER_CLIP

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} questions")
        batch = self.__getitems__([index])
        audio = {"waveform": batch["audio"]["waveform"][0], "lengths": batch["audio"]["lengths"][0]}
        return {"audio": audio, "text": batch["text"][0], "label": batch["label"][0], "group": batch["group"][0]}

    def __getitems__(self, indices: list[int]) -> dict[str, Any]:
        index = np.asarray(indices, dtype=np.int64)
        if len(index) and not (0 <= index.min() and index.max() < len(self)):
            raise IndexError(f"indices {indices} out of range for {len(self)} questions")
        clip, q = self.clip_indices[index // QUESTIONS_PER_CLIP], index % QUESTIONS_PER_CLIP
        s = self.scenes
        group, subtype, kind = s.question_group[clip, q], s.question_subtype[clip, q], s.question_kind[clip, q]
        if self.waveforms is not None:
            waveform = torch.from_numpy(self.waveforms[clip].astype(np.float32))
            audio = {"waveform": waveform, "lengths": torch.full((len(clip),), CLIP_SAMPLES, dtype=torch.long)}
        else:
            rendered = {n: render_clip(s, n) for n in set(clip.tolist())}  # a clip's questions share its waveform
            audio = pad_clips([rendered[n] for n in clip.tolist()])
        return {
            "audio": audio,
            "text": [question_text(*t) for t in zip(group.tolist(), subtype.tolist(), kind.tolist(), strict=True)],
            "label": torch.from_numpy(s.answers[clip, q]),
            "group": torch.from_numpy(group.astype(np.int64)),
        }


class SoundScenesDataModule(SplitLoaders):
    """Sound Scenes questions in batches ``{"audio": {"waveform": [B, 16000], "lengths": [B]}, "text": list[str],
    "label": [B], "group": [B]}`` (8 kHz: give the audio encoder ``sample_rate: 8000``).

    Splits are by clip: the first ``test_clips`` clips are the test split, the next ``val_clips`` validation, the
    rest training, so the test set stays the same when ``num_clips`` grows. The training loader shuffles with a
    :class:`~datamodules._common.SeededShuffleSampler` seeded with ``seed``: the order depends only on ``(seed,
    epoch)`` and survives a resume.

    Args:
        num_clips: clips to generate (6 questions each); must exceed ``val_clips + test_clips``.
        seed: seed of the generator and of the training order.
        val_clips: clips whose questions form the validation split.
        test_clips: clips whose questions form the test split.
        batch_size: questions per batch.
        num_workers: DataLoader worker processes.
        pin_memory: pin batches in page-locked memory; ``None`` pins when CUDA is available.
        prerender: render every clip once in :meth:`setup` (32 KB a clip in float16: 192 MB for 6,000 clips,
            shared with forked workers) instead of at every fetch, on the loader's critical path (what kept the H200
            waiting in the README's audio runs).

    Attributes:
        num_classes: 14, the size of ``ANSWERS``.
        group_names: ``["count", "exists", "pitch", "order"]``.
        answers: ``ANSWERS`` as a list: the answer string of each label.
        sample_rate: 8000.
    """

    def __init__(
        self,
        *,
        num_clips: int = 6000,
        seed: int = 0,
        val_clips: int = 300,
        test_clips: int = 300,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        prerender: bool = True,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        for key, value in (("val_clips", val_clips), ("test_clips", test_clips)):
            if value < 0:
                raise ConfigError(f"{name}: {key}={value} must be >= 0")
        if num_clips <= val_clips + test_clips:
            raise ConfigError(
                f"{name}: num_clips={num_clips} must exceed val_clips + test_clips = {val_clips + test_clips}"
            )
        check_loader_args(name, batch_size=batch_size, num_workers=num_workers, seed=seed)
        self.save_hyperparameters()
        self.num_clips, self.seed = num_clips, seed
        self.val_clips, self.test_clips = val_clips, test_clips
        self.batch_size, self.num_workers, self.pin_memory = batch_size, num_workers, pin_memory
        self.prerender = prerender
        self.num_classes = len(ANSWERS)
        self.group_names = list(GROUP_NAMES)
        self.answers = list(ANSWERS)
        self.sample_rate = SAMPLE_RATE
        self.scenes: SoundScenes | None = None

    def setup(self, stage: str | None = None) -> None:
        """Draw the scene table and build the three splits."""
        if self.scenes is not None:
            return
        self.scenes = scenes = generate_sound_scenes(self.num_clips, seed=self.seed)
        waveforms = render_clips(scenes) if self.prerender else None
        val_end = self.test_clips + self.val_clips
        splits = {"test": (0, self.test_clips), "val": (self.test_clips, val_end), "train": (val_end, self.num_clips)}
        for split, (start, end) in splits.items():
            setattr(self, f"{split}_dataset", SoundScenesDataset(scenes, np.arange(start, end), waveforms=waveforms))


__all__ = [
    "ANSWERS",
    "GROUP_NAMES",
    "KINDS",
    "PITCHES",
    "SoundScenes",
    "SoundScenesDataModule",
    "SoundScenesDataset",
    "generate_sound_scenes",
    "render_clip",
    "render_clips",
]
