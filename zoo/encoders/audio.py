"""An audio encoder: log-mel spectrogram (torchaudio), convolutional subsampling, transformer blocks."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from zoo.contracts import Encoder, FFNFactory, Tokens
from zoo.errors import ConfigError, check_sizes
from zoo.layers.ffn import FeedForward
from zoo.layers.position import sincos_1d
from zoo.layers.transformer import TransformerBlock, padding_attn_mask


class SpectrogramAudioEncoder(Encoder):
    """``{"waveform": [B, S], "lengths": [B]} -> Tokens [B, T, dim]``, one token per ``4 * hop_length`` samples.

    The waveform is mono at ``sample_rate`` Hz; ``lengths`` gives each clip's real length in samples (padding after
    it is masked out). Two stride-2 convolutions subsample the log-mel frames by 4, as in Conformer/Whisper stems.

    SpecAugment (Park et al. 2019), in training only and off by default: ``freq_masks`` bands of up to
    ``freq_mask_width`` mel bins and ``time_masks`` spans of up to ``time_mask_width`` frames, drawn for each clip,
    set to the clip's mean log-mel. It helps classifiers of sounds; leave it off where a band carries the answer
    (the pitch questions of Sound Scenes).

    Args:
        sample_rate: expected sample rate in Hz.
        n_mels: mel bands.
        hop_length: STFT hop in samples.
        dim: token width.
        depth: transformer blocks after the stem.
        num_heads: attention heads.
        ffn: FFN factory for the blocks.
        freq_masks: SpecAugment frequency masks per clip.
        freq_mask_width: widest frequency mask, in mel bins.
        time_masks: SpecAugment time masks per clip.
        time_mask_width: widest time mask, in frames (of ``hop_length`` samples).
    """

    def __init__(
        self,
        *,
        sample_rate: int = 16000,
        n_mels: int = 64,
        hop_length: int = 160,
        dim: int = 128,
        depth: int = 2,
        num_heads: int = 4,
        ffn: FFNFactory = FeedForward,
        freq_masks: int = 0,
        freq_mask_width: int = 8,
        time_masks: int = 0,
        time_mask_width: int = 20,
    ) -> None:
        super().__init__()
        import torchaudio

        sizes = {"sample_rate": sample_rate, "n_mels": n_mels, "hop_length": hop_length, "dim": dim}
        check_sizes("SpectrogramAudioEncoder", **sizes, num_heads=num_heads)
        if depth < 0:
            raise ConfigError(f"SpectrogramAudioEncoder: depth={depth} must be >= 0")
        for key, value in (("freq_masks", freq_masks), ("freq_mask_width", freq_mask_width),
                           ("time_masks", time_masks), ("time_mask_width", time_mask_width)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"SpectrogramAudioEncoder: {key}={value!r} must be an integer >= 0")
        if freq_mask_width > n_mels:
            raise ConfigError(f"SpectrogramAudioEncoder: freq_mask_width={freq_mask_width} exceeds n_mels={n_mels}")
        self.freq_masks, self.freq_mask_width = freq_masks, freq_mask_width
        self.time_masks, self.time_mask_width = time_masks, time_mask_width

        self.sample_rate, self.hop_length = sample_rate, hop_length
        self.melspec = torchaudio.transforms.MelSpectrogram(
            sample_rate=sample_rate, n_fft=4 * hop_length, hop_length=hop_length, n_mels=n_mels
        )
        self.stem = nn.Sequential(
            nn.Conv1d(n_mels, dim, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv1d(dim, dim, 3, stride=2, padding=1),
            nn.GELU(),
        )
        self.stem_norm = nn.LayerNorm(dim)
        self.blocks = nn.ModuleList(TransformerBlock(dim, num_heads, ffn=ffn) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.out_dim = dim

    def forward(self, inputs: dict[str, Tensor]) -> Tokens:
        waveform, lengths = inputs["waveform"], inputs["lengths"]
        if waveform.dim() != 2:
            raise ConfigError(f"SpectrogramAudioEncoder: waveform must be [B, S], got {tuple(waveform.shape)}")
        with torch.autocast(waveform.device.type, enabled=False):  # the STFT wants fp32
            mel = (self.melspec(waveform.float()) + 1e-6).log()  # [B, n_mels, frames]
            if self.training and (self.freq_masks or self.time_masks):
                mel = self.spec_augment(mel)
        x = self.stem_norm(self.stem(mel).transpose(1, 2))  # [B, T, dim], unit scale like the position code
        frames = torch.div(lengths, self.hop_length, rounding_mode="floor") + 1
        valid = torch.div(frames + 3, 4, rounding_mode="floor").clamp(min=1, max=x.shape[1])
        mask = torch.arange(x.shape[1], device=x.device)[None, :] < valid[:, None]
        x = x + sincos_1d(torch.arange(x.shape[1], device=x.device), x.shape[-1]).to(x.dtype)
        attn_mask = padding_attn_mask(mask)
        for block in self.blocks:
            x = block(x, attn_mask)
        return Tokens(self.norm(x), mask)

    def spec_augment(self, mel: Tensor) -> Tensor:
        """Log-mel ``[B, n_mels, frames]`` with SpecAugment's masks, each clip's own, set to that clip's mean."""
        from torchaudio.functional import mask_along_axis_iid

        keep = torch.ones_like(mel).unsqueeze(1)  # [B, 1, n_mels, frames]: the masks are drawn on it as zeros
        for _ in range(self.freq_masks):
            keep = mask_along_axis_iid(keep, self.freq_mask_width, 0.0, axis=2)
        for _ in range(self.time_masks):
            keep = mask_along_axis_iid(keep, self.time_mask_width, 0.0, axis=3)
        return torch.where(keep.squeeze(1).bool(), mel, mel.mean(dim=(1, 2), keepdim=True))
