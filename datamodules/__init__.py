"""Data only: one LightningDataModule per data set or format, each meeting the contract of ``docs/ARCHITECTURE.md``
(``num_classes`` and ``group_names`` known right after ``__init__``; batches of ``image``, ``text``, ``audio``,
``label``, ``group``; a training order that is a function of ``(seed, epoch)``)."""

from datamodules._common import RankShardedSampler, SeededShuffleSampler, collate, normalize_image
from datamodules.audio_folder import AudioClipDataset, AudioFolderDataModule
from datamodules.sort_of_clevr import SortOfCLEVRDataModule, SortOfCLEVRDataset, generate_sort_of_clevr
from datamodules.vqa_folder import VQAFolderDataModule, VQAFolderDataset

__all__ = [
    "AudioClipDataset",
    "AudioFolderDataModule",
    "RankShardedSampler",
    "SeededShuffleSampler",
    "SortOfCLEVRDataModule",
    "SortOfCLEVRDataset",
    "VQAFolderDataModule",
    "VQAFolderDataset",
    "collate",
    "generate_sort_of_clevr",
    "normalize_image",
]
