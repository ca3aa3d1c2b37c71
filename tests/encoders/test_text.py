"""Hugging Face text towers: tiny random BERT / GPT-2 / Llama, offline loading from a
saved folder, and the real MiniLM against sentence-transformers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import MINILM

from vlp.data import HFTokenizer
from vlp.encoders import HFCausalLM, HFTextEncoder
from vlp.errors import CheckpointError, ConfigError
from vlp.utils.paths import resolve_path

BERT = {
    "model_type": "bert",
    "vocab_size": 100,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 32,
}
GPT2 = {
    "model_type": "gpt2",
    "vocab_size": 100,
    "n_embd": 32,
    "n_layer": 2,
    "n_head": 2,
    "n_positions": 32,
    "bos_token_id": 0,
    "eos_token_id": 0,
}
LLAMA = {
    "model_type": "llama",
    "vocab_size": 100,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "intermediate_size": 64,
    "max_position_embeddings": 32,
    "tie_word_embeddings": False,
    "bos_token_id": 0,
    "eos_token_id": 0,
    "pad_token_id": 0,
}


def text_batch(b: int = 3, length: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, 100, (b, length), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(b, length, dtype=torch.long)
    mask[0, 4:] = 0  # right padding
    mask[1, 2:] = 0
    return ids, mask


def bert(**kwargs) -> HFTextEncoder:
    torch.manual_seed(0)
    return HFTextEncoder(config=BERT, **kwargs)


# -- bidirectional encoders ---------------------------------------------------------------
@pytest.mark.parametrize("pooling", ["cls", "mean", "pooler"])
def test_text_encoder_shapes_mask_and_pooling(pooling):
    enc = bert(pooling=pooling, add_pooling_layer=pooling == "pooler").eval()
    ids, mask = text_batch()
    out = enc(ids, mask)
    assert out.tokens.shape == (3, 6, 32) and out.pooled.shape == (3, 32)
    assert (enc.dim, enc.pooled_dim) == (32, 32) and enc.config is enc.model.config
    assert out.mask.dtype == torch.bool and torch.equal(out.mask, mask.bool())
    if pooling == "cls":
        expected = out.tokens[:, 0]
    elif pooling == "mean":
        expected = torch.stack([out.tokens[i, : int(mask[i].sum())].mean(0) for i in range(3)])
    else:
        expected = enc.model.pooler(out.tokens)  # BERT's dense + tanh on the first token
    torch.testing.assert_close(out.pooled, expected)
    changed = ids.clone()
    changed[~mask.bool()] = 7  # other tokens under the padding change nothing that is real
    again = enc(changed, mask)
    torch.testing.assert_close(again.pooled, out.pooled)
    torch.testing.assert_close(again.tokens[mask.bool()], out.tokens[mask.bool()])


def test_text_encoder_gradients(checks):
    enc = bert(pooling="mean")
    checks.grads(enc, checks.loss(enc(*text_batch())))
    # With the pooler kept but CLS pooling, the pooler is legitimately unused: no gradient.
    enc = bert(pooling="cls", add_pooling_layer=True)
    checks.grads(enc, checks.loss(enc(*text_batch())), no_grad=("model.pooler.",))


def test_text_encoder_lock(checks):
    checks.lock(bert, n_groups=3)  # embeddings, 2 layers
    checks.lock(lambda: bert(add_pooling_layer=True), n_groups=4)  # + pooler
    enc = bert()
    groups = [list(g.members) for g in enc.layer_groups()]
    assert groups == [[enc.model.embeddings], *([layer] for layer in enc.model.encoder.layer)]


def test_text_encoder_grad_checkpointing_gives_the_same_gradients():
    grads = []
    for enable in (False, True):
        enc = bert(gradient_checkpointing=enable).train()
        assert enc.model.encoder.layer[0].gradient_checkpointing == enable
        torch.manual_seed(1)  # the same dropout masks
        enc(*text_batch()).pooled.square().sum().backward()
        grads.append(enc.model.embeddings.word_embeddings.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_text_encoder_loads_a_saved_folder_offline(tmp_path, offline):
    from transformers import AutoTokenizer

    source = HFTextEncoder(config={**BERT, "vocab_size": 30522}).eval()
    source.model.save_pretrained(tmp_path / "bert")
    AutoTokenizer.from_pretrained(resolve_path(MINILM)).save_pretrained(tmp_path / "bert")
    tok = HFTokenizer(str(tmp_path / "bert"), max_length=16)
    batch = tok(["a red square", "two blue circles on a green background"])
    loaded = HFTextEncoder(str(tmp_path / "bert"), config={"hidden_dropout_prob": 0.0}).eval()
    assert loaded.config.hidden_dropout_prob == 0.0 and loaded.model.pooler is None
    torch.testing.assert_close(loaded(**batch).tokens, source(**batch).tokens)


def test_config_overrides_typed_on_the_command_line_are_numbers(tmp_path):
    """`--...config.hidden_dropout_prob 0.1` arrives as the string "0.1"."""
    enc = HFTextEncoder(config={**BERT, "hidden_dropout_prob": "0.0", "num_hidden_layers": "1"})
    assert enc.config.hidden_dropout_prob == 0.0 and enc.config.num_hidden_layers == 1
    with pytest.raises(ConfigError, match="hidden_dropout_prob"):
        HFTextEncoder(MINILM, config={"hidden_dropout_prob": "lots"})


def test_text_encoder_bad_names_and_paths(tmp_path):
    with pytest.raises(ConfigError, match="nowhere"):
        HFTextEncoder(str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="empty"):
        (tmp_path / "empty").mkdir()
        HFTextEncoder(str(tmp_path / "empty"))
    bert().model.save_pretrained(tmp_path / "broken")
    (tmp_path / "broken" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="broken"):
        HFTextEncoder(str(tmp_path / "broken"))
    with pytest.raises(ConfigError, match="model_type"):
        HFTextEncoder(config={"hidden_size": 32})
    with pytest.raises(ConfigError, match="add_pooling_layer"):
        HFTextEncoder(config=BERT, pooling="pooler")
    with pytest.raises(ConfigError, match="pooling"):
        HFTextEncoder(config=BERT, pooling="max")


def test_minilm_matches_sentence_transformers():
    """The real pretrained MiniLM-L6: mean pooling + L2 norm is what sentence-transformers computes."""
    from sentence_transformers import SentenceTransformer

    sentences = [
        "A photo of a cat sitting on a red sofa.",
        "Two dogs run along the beach at sunset.",
    ]
    enc = HFTextEncoder(MINILM, pooling="mean").eval()
    assert enc.dim == 384 and len(enc.layer_groups()) == 1 + 6
    batch = HFTokenizer(MINILM, max_length=128)(sentences)
    with torch.no_grad():
        ours = F.normalize(enc(**batch).pooled, dim=-1)
    reference = SentenceTransformer(resolve_path(MINILM), device="cpu").encode(sentences, convert_to_tensor=True)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-4)


# -- causal language models ---------------------------------------------------------------
def causal(config: dict) -> HFCausalLM:
    torch.manual_seed(0)
    return HFCausalLM(config=config)


@pytest.mark.parametrize("config", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_causal_lm_pools_the_last_real_token(config):
    lm = causal(config).eval()
    ids, mask = text_batch()
    out = lm(ids, mask)
    assert out.tokens.shape == (3, 6, 32) and out.pooled.shape == (3, 32) and lm.dim == 32
    lengths = mask.sum(1)
    torch.testing.assert_close(out.pooled, out.tokens[torch.arange(3), lengths - 1])
    logits = lm.logits(out.tokens)
    assert logits.shape == (3, 6, 100)
    with torch.no_grad():  # the full HF model on the last (unpadded) row gives the same logits
        torch.testing.assert_close(logits[2:], lm.model(input_ids=ids[2:]).logits)
    assert lm.decoder_layers() is lm.model.base_model.get_submodule("h" if config is GPT2 else "layers")


@pytest.mark.parametrize("config", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_causal_lm_gradients_and_lock(config, checks):
    lm = causal(config)
    out = lm(*text_batch())
    checks.grads(lm, checks.loss(out, lm.logits(out.tokens)))
    checks.lock(lambda: causal(config), n_groups=4)  # embeddings, 2 layers, final norm (+ lm head)
    top = {n for n, p in lm.model.named_parameters() if any(p is q for q in lm.layer_groups()[-1].parameters())}
    # GPT-2 ties its LM head to the token embeddings, which stay in the bottom group.
    assert top == (
        {"transformer.ln_f.weight", "transformer.ln_f.bias"}
        if config is GPT2
        else {"model.norm.weight", "lm_head.weight"}
    )


def test_causal_lm_resize_and_offline_reload(tmp_path, offline):
    lm = causal(GPT2).eval()
    lm.resize_token_embeddings(120)
    ids, mask = text_batch()
    assert lm.logits(lm(ids, mask).tokens).shape == (3, 6, 120)
    lm.model.save_pretrained(tmp_path / "gpt2")
    loaded = HFCausalLM(str(tmp_path / "gpt2")).eval()
    torch.testing.assert_close(loaded.logits(loaded(ids, mask).tokens), lm.logits(lm(ids, mask).tokens))


def test_pretrained_models_start_in_train_mode(tmp_path):
    """from_pretrained returns eval mode (dropout off); a tower must train like the rest."""
    from transformers import BertConfig, BertModel

    BertModel(
        BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    ).save_pretrained(tmp_path / "bert")
    enc = HFTextEncoder(str(tmp_path / "bert"))
    assert all(m.training for m in enc.modules())


# -- GGUF checkpoints ----------------------------------------------------------------------
def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row order (its converter's ``permute``); transformers undoes it on load."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(model, path) -> None:
    """A Hugging Face Llama written as llama.cpp writes one (float32 tensors, GGUF names)."""
    try:
        import gguf
    except ImportError:
        pytest.fail("the gguf package is missing: pip install -e '.[dev]' (gguf is in vlp's dev extra)")
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(c.vocab_size)])
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    names = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight"}
    parts = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v"}
    parts |= {"self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up"}
    parts |= {"mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for key, t in sd.items():
        if key == "lm_head.weight":
            name = "output.weight"
        elif key.startswith("model.layers."):
            i, rest = key.removeprefix("model.layers.").split(".", 1)
            part = rest.removesuffix(".weight")
            name = f"blk.{i}.{parts[part]}.weight"
            if part == "self_attn.q_proj":
                t = _permute(t, c.num_attention_heads)
            elif part == "self_attn.k_proj":
                t = _permute(t, c.num_key_value_heads)
        else:
            name = names[key.removeprefix("model.")]
        w.add_tensor(name, t.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_causal_lm_loads_a_gguf_checkpoint(tmp_path, offline):
    lm = causal(LLAMA).eval()
    write_llama_gguf(lm.model, tmp_path / "tiny.gguf")
    loaded = HFCausalLM(str(tmp_path), gguf_file="tiny.gguf").eval()
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert loaded.model.config.num_key_value_heads == 1 and not loaded.model.config.tie_word_embeddings
    ids, mask = text_batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded.logits(loaded(ids, mask).tokens), lm.logits(lm(ids, mask).tokens))
    assert len(loaded.decoder_layers()) == 2


def test_gguf_mistakes_are_named(tmp_path):
    with pytest.raises(ConfigError, match="needs name_or_path"):
        HFCausalLM(gguf_file="tiny.gguf")
    with pytest.raises(ConfigError, match=r"no GGUF file 'tiny.gguf' in .*none"):
        HFCausalLM(str(tmp_path), gguf_file="tiny.gguf")
    with pytest.raises(ConfigError, match="must name a .gguf file"):
        HFCausalLM(str(tmp_path), gguf_file="model.safetensors")
