"""Hugging Face text towers: bidirectional encoders and causal language models.

A model comes from a hub name (honours ``HF_HUB_OFFLINE=1``), a local folder (loaded with
``local_files_only``: never the network), or a config alone (random init); a name plus a
config loads the pretrained weights with those config overrides.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable

import torch
from torch import nn

from vlp.encoders.base import EncoderOutput
from vlp.encoders.vision import GroupedEncoder, brief
from vlp.errors import CheckpointError, ConfigError
from vlp.utils.paths import is_local, resolve_path


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"dtype must name a torch dtype (float32, bfloat16...), got {name!r}")
    return dtype


def _scalar(value):
    """Config values typed on the command line arrive as strings ("0.1"): numbers and
    booleans among them are converted, everything else is kept."""
    if isinstance(value, str):
        import yaml

        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            return value
        if isinstance(parsed, (bool, int, float)):
            return parsed
    return value


def check_config_keys(cfg, keys) -> None:
    """ConfigError naming every key of ``keys`` that is no field of ``cfg``'s config class (a
    typo there is otherwise dropped by ``from_pretrained`` or kept unused by ``for_model``),
    with the close matches among the fields."""
    try:
        reference = type(cfg)()  # the defaults: for_model also stores unknown keys on cfg
    except Exception:  # a composite config without defaults: its keys cannot be listed
        return
    fields = set(reference.to_dict())
    unknown = [k for k in keys if k != "model_type" and k not in fields and not hasattr(reference, k)]
    if unknown:
        hints = {k: difflib.get_close_matches(k, sorted(fields), n=3) for k in unknown}
        said = "; ".join(f"{k!r} (did you mean {', '.join(m)}?)" if m else repr(k) for k, m in hints.items())
        raise ConfigError(f"text model config keys are not fields of {type(cfg).__name__}: {said}")


def load_hf_model(
    auto_cls, name_or_path: str | None, config: dict | None, *, gguf_file: str | None = None, **kwargs
) -> nn.Module:
    """``auto_cls`` (AutoModel, AutoModelForCausalLM) from a name/folder and/or a config dict.

    ``add_pooling_layer`` in ``kwargs`` is passed only to models that take it. ``gguf_file``:
    the name of a GGUF checkpoint in the folder (or hub repo) ``name_or_path``, its config
    and weights read by transformers (dequantised to ``dtype``; needs the ``gguf`` package).
    """
    from transformers import AutoConfig

    config = {k: _scalar(v) for k, v in (config or {}).items()}
    if gguf_file is not None:
        name_or_path = _check_gguf(name_or_path, gguf_file)
        kwargs["gguf_file"] = gguf_file
    if name_or_path is None:
        if "model_type" not in config:
            raise ConfigError(f"a text model config needs 'model_type' (bert, gpt2...), got {config}")
        cfg = AutoConfig.for_model(**config)
    else:
        path = resolve_path(name_or_path)
        local = is_local(path)
        if not local and (path.startswith(("/", ".", "~")) or path.count("/") > 1):
            raise ConfigError(f"model folder {path!r} does not exist")
        config.pop("model_type", None)
        try:
            cfg = AutoConfig.from_pretrained(
                path, local_files_only=local, **({"gguf_file": gguf_file} if gguf_file else {}), **config
            )
        except Exception as e:  # OSError, ValueError, transformers' field validation errors
            where = "local folder" if local else "hub name (offline? give a local folder)"
            raise ConfigError(f"cannot load a model config from {path!r} as a {where}: {brief(e)}") from None
    check_config_keys(cfg, config)
    try:
        model_cls = auto_cls._model_mapping[type(cfg)]
    except KeyError:
        raise ConfigError(f"{auto_cls.__name__} has no model for model_type {cfg.model_type!r}") from None
    if "add_pooling_layer" not in inspect.signature(model_cls.__init__).parameters:
        if kwargs.pop("add_pooling_layer", False):
            raise ConfigError(f"{model_cls.__name__} has no pooling layer (add_pooling_layer=True)")
    if name_or_path is None:
        try:
            return auto_cls.from_config(cfg, **kwargs)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"cannot build {model_cls.__name__} from {config}: {brief(e)}") from None
    try:
        return auto_cls.from_pretrained(path, config=cfg, local_files_only=local, **kwargs)
    except Exception as e:
        raise CheckpointError(f"cannot load {model_cls.__name__} weights from {path!r}: {brief(e)}") from None


def _check_gguf(name_or_path: str | None, gguf_file: str) -> str:
    """The folder of a GGUF checkpoint, after checking that the file and the ``gguf`` package
    are there (transformers' own errors name neither)."""
    import importlib.util
    from pathlib import Path

    if name_or_path is None:
        raise ConfigError(f"gguf_file={gguf_file!r} needs name_or_path: the folder (or hub repo) that holds it")
    if not isinstance(gguf_file, str) or not gguf_file.endswith(".gguf"):
        raise ConfigError(f"gguf_file must name a .gguf file in {name_or_path!r}, got {gguf_file!r}")
    path = resolve_path(name_or_path)
    if is_local(path) and not (Path(path).expanduser() / gguf_file).is_file():
        found = sorted(p.name for p in Path(path).expanduser().glob("*.gguf"))
        raise ConfigError(f"no GGUF file {gguf_file!r} in {path!r} (.gguf files there: {found or 'none'})")
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(
            f"loading {gguf_file!r} needs the 'gguf' package (pip install gguf accelerate; it is in vlp's dev extra)"
        )
    return name_or_path


def _layers(model: nn.Module, n: int) -> str:
    """Where the transformer layers are: the first ModuleList of ``num_hidden_layers`` modules."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return name
    raise ConfigError(f"{type(model).__name__}: no list of {n} transformer layers found")


def _layer_group_of(model: nn.Module, prefix: str, n: int) -> Callable[[str], int]:
    """0 for parameters before the layers (embeddings), 1 + i for layer i, n + 1 after."""
    names = [name for name, _ in model.named_parameters()]
    first = next(i for i, name in enumerate(names) if name.startswith(prefix))
    order = {name: i for i, name in enumerate(names)}

    def group_of(name: str) -> int:
        if name.startswith(prefix):
            return 1 + int(name[len(prefix) :].split(".")[0])
        return 0 if order[name] < first else n + 1

    return group_of


class _HFEncoderBase(GroupedEncoder):
    model: nn.Module

    def _setup(self) -> None:
        self.model.train()  # from_pretrained returns eval mode; Lightning sets modes from here on
        self.config = self.model.config
        self.dim = self.pooled_dim = self.config.hidden_size
        self._layers_name = _layers(self.model, self.config.num_hidden_layers)

    @property
    def vocab_size(self) -> int:
        """Rows of the input embedding: token ids at or above it cannot go in."""
        return self.model.get_input_embeddings().num_embeddings

    @property
    def max_length(self) -> int | None:
        """Rows of the absolute position embedding, less the offset of models whose positions
        start after the padding index (RoBERTa: 514 rows, 512 tokens); None without a table."""
        embeddings = getattr(self.model.base_model, "embeddings", None)
        table = getattr(embeddings, "position_embeddings", None)
        if not isinstance(table, nn.Embedding):
            return None
        pad = getattr(embeddings, "padding_idx", None)
        return table.num_embeddings - (pad + 1 if pad is not None else 0)

    def _grouping(self) -> tuple[nn.Module, Callable[[str], int]]:
        n = len(self.model.get_submodule(self._layers_name))
        return self.model, _layer_group_of(self.model, self._layers_name + ".", n)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute layer activations in backward (training mode only) to save memory."""
        m = self.model  # transformers >= 5.x renamed gradient_ to activation_checkpointing
        prefix = "activation" if hasattr(m, "activation_checkpointing_enable") else "gradient"
        if enable:
            getattr(m, f"{prefix}_checkpointing_enable")({"use_reentrant": False})
        else:
            getattr(m, f"{prefix}_checkpointing_disable")()


class HFTextEncoder(_HFEncoderBase):
    """A Hugging Face bidirectional encoder (BERT, RoBERTa, MiniLM...) as a text tower.

    Args:
        name_or_path: hub name (``bert-base-uncased``), local folder or ``pkg://`` folder;
            None builds a random-init model from ``config``.
        config: ``AutoConfig.for_model`` arguments (must include ``model_type``) for random
            init, or config overrides (``hidden_dropout_prob``...) for a pretrained model.
        pooling: "cls" (first token), "mean" (mean of real tokens) or "pooler" (the model's
            pooler output; needs ``add_pooling_layer``).
        add_pooling_layer: keep the model's pooler (BERT's dense + tanh on the first token).
        attn_implementation: "sdpa", "eager" or "flash_attention_2".
        gradient_checkpointing: recompute layer activations in backward to save memory.
        dtype: parameter dtype; float32 keeps full-precision master weights for mixed precision.
    """

    def __init__(
        self,
        name_or_path: str | None = None,
        *,
        config: dict | None = None,
        pooling: str = "cls",
        add_pooling_layer: bool = False,
        attn_implementation: str = "sdpa",
        gradient_checkpointing: bool = False,
        dtype: str = "float32",
    ) -> None:
        super().__init__()
        from transformers import AutoModel

        if pooling not in ("cls", "mean", "pooler"):
            raise ConfigError(f"pooling must be 'cls', 'mean' or 'pooler', got {pooling!r}")
        if pooling == "pooler" and not add_pooling_layer:
            raise ConfigError("pooling='pooler' needs add_pooling_layer=True")
        self.pooling = pooling
        self.model = load_hf_model(
            AutoModel,
            name_or_path,
            config,
            add_pooling_layer=add_pooling_layer,
            attn_implementation=attn_implementation,
            dtype=_dtype(dtype),
        )
        self._setup()
        if gradient_checkpointing:
            self.set_grad_checkpointing(True)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> EncoderOutput:
        """``input_ids`` (B, L) and ``attention_mask`` (B, L), 1 for real tokens, 0 for padding;
        ``token_type_ids`` (B, L) of a sentence pair (0 a, 1 b), used by models with a token-type
        embedding (BERT) and dropped for those without (DistilBERT; the [SEP] separates a and b)."""
        kwargs = {}
        types = getattr(self.config, "type_vocab_size", None)
        if token_type_ids is not None and types:
            if int(token_type_ids.max()) >= types:
                raise ConfigError(
                    f"token type {int(token_type_ids.max())} given, but the text model has type_vocab_size {types}"
                )
            kwargs["token_type_ids"] = token_type_ids
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        tokens = out.last_hidden_state  # (B, L, D)
        mask = attention_mask.bool() if attention_mask is not None else None
        if self.pooling == "cls":
            pooled = tokens[:, 0]
        elif self.pooling == "pooler":
            pooled = out.pooler_output
        elif mask is None:
            pooled = tokens.mean(dim=1)
        else:
            weight = mask.unsqueeze(-1).to(tokens.dtype)  # (B, L, 1)
            pooled = (tokens * weight).sum(dim=1) / weight.sum(dim=1).clamp(min=1.0)  # (B, D)
        return EncoderOutput(tokens=tokens, pooled=pooled, mask=mask)


class HFCausalLM(_HFEncoderBase):
    """A Hugging Face decoder-only language model (GPT-2, Llama, Qwen...).

    ``forward`` runs the backbone only (no logits): ``tokens`` are the final hidden states
    and ``pooled`` the hidden state of the last real token. ``logits(tokens)`` applies the
    LM head; models that post-process logits (soft-capping) need that done by the caller.

    Args:
        name_or_path: hub name, local folder or ``pkg://`` folder; None builds from ``config``.
        config: ``AutoConfig.for_model`` arguments (with ``model_type``) for random init, or
            config overrides for a pretrained model.
        attn_implementation: "sdpa", "eager" or "flash_attention_2".
        dtype: parameter dtype (float32, or bfloat16 for a frozen LM).
        gguf_file: a GGUF checkpoint (llama.cpp's format, e.g. ``SmolLM2-135M-Instruct.Q4_1.gguf``)
            in the folder ``name_or_path``: config and weights from it, quantised weights
            dequantised to ``dtype`` (transformers' GGUF loader; needs ``gguf``).
    """

    def __init__(
        self,
        name_or_path: str | None = None,
        *,
        config: dict | None = None,
        attn_implementation: str = "sdpa",
        dtype: str = "float32",
        gguf_file: str | None = None,
    ) -> None:
        super().__init__()
        from transformers import AutoModelForCausalLM

        self.model = load_hf_model(
            AutoModelForCausalLM,
            name_or_path,
            config,
            gguf_file=gguf_file,
            attn_implementation=attn_implementation,
            dtype=_dtype(dtype),
        )
        self._setup()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> EncoderOutput:
        """``input_ids`` (B, L) and ``attention_mask`` (B, L), 1 for real tokens, 0 for padding."""
        out = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        tokens = out.last_hidden_state  # (B, L, D), after the final norm
        if attention_mask is None:
            last = torch.full(input_ids.shape[:1], input_ids.shape[1] - 1, device=input_ids.device)
        else:  # index of the last real token: also right for left padding
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            last = (attention_mask.long() * positions).argmax(dim=1)  # (B,)
        pooled = tokens[torch.arange(tokens.shape[0], device=tokens.device), last]  # (B, D)
        mask = attention_mask.bool() if attention_mask is not None else None
        return EncoderOutput(tokens=tokens, pooled=pooled, mask=mask)

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L, D) hidden states -> (B, L, V) next-token logits through the LM head."""
        return self.model.get_output_embeddings()(tokens)

    def decoder_layers(self) -> nn.ModuleList:
        """The transformer layers, bottom to top (where gated cross-attention can be inserted)."""
        return self.model.get_submodule(self._layers_name)

    def resize_token_embeddings(self, n: int) -> None:
        """Resize the input embeddings (and a tied or untied LM head) to ``n`` tokens."""
        self.model.resize_token_embeddings(n)


def resize_token_embeddings(encoder: nn.Module, vocab_size: int) -> nn.Module:
    """Grow the input embedding of a Hugging Face text tower (``HFTextEncoder``,
    ``HFCausalLM`` or a bare ``PreTrainedModel``) to ``vocab_size`` rows, e.g. the size of a
    tokenizer with added special tokens (``tokenizer.vocab_size``). The old rows are kept;
    each new row is the mean of the old rows (a neutral start for ``<image>`` and
    ``<|endofchunk|>``). A tied LM head follows the embedding; an untied one grows the same
    way. A table already that large is left alone; a smaller ``vocab_size`` is refused.
    Returns ``encoder``."""
    from transformers import PreTrainedModel

    # a vlp tower holds its HF model as .model; a bare PreTrainedModel is resized itself (its
    # own .model, e.g. LlamaForCausalLM's backbone, would leave the LM head behind)
    model = encoder if isinstance(encoder, PreTrainedModel) else getattr(encoder, "model", encoder)
    if not hasattr(model, "get_input_embeddings"):
        raise ConfigError(f"{type(encoder).__name__} has no Hugging Face input embedding to resize")
    old = model.get_input_embeddings()
    n = old.num_embeddings
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < n:
        raise ConfigError(
            f"resize_token_embeddings: vocab_size must be an integer >= {n} (the rows now), got {vocab_size!r}"
        )
    if vocab_size == n:
        return encoder
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    untied = head is not None and head.weight is not old.weight
    head_weight = head.weight.detach().clone() if untied else None
    head_bias = head.bias.detach().clone() if untied and getattr(head, "bias", None) is not None else None
    with torch.no_grad():
        mean = old.weight.mean(dim=0)  # (D,)
        model.resize_token_embeddings(vocab_size)
        new = model.get_input_embeddings()
        new.weight[n:] = mean
        if untied:
            grown = model.get_output_embeddings()
            grown.weight[n:] = head_weight.mean(dim=0)
            if head_bias is not None:
                grown.bias[n:] = 0.0
    return encoder
