"""accel_tp.model: tokenizer loading, model configs and model building (tiny, CPU, local files only)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from accel_tp.config import ConfigError, ModelSection
from accel_tp.corpus import EOS_TOKEN, PAD_TOKEN
from accel_tp.model import architecture_config, build_model, load_tokenizer, model_config
from accel_tp.parallel import check_tp_heads

TINY_QWEN2 = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A tiny random Qwen2 written with save_pretrained, and its state dict."""
    d = tmp_path_factory.mktemp("tiny-qwen2")
    torch.manual_seed(1234)
    model = Qwen2ForCausalLM(Qwen2Config(**TINY_QWEN2))
    model.save_pretrained(str(d))
    return d, {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------------------------
# load_tokenizer


def test_default_tokenizer(tmp_path: Path, default_tokenizer) -> None:
    tok = load_tokenizer(ModelSection(architecture="tiny", tokenizer="default"), tmp_path)
    assert tok.get_vocab() == default_tokenizer.get_vocab()
    assert tok.pad_token == PAD_TOKEN and tok.eos_token == EOS_TOKEN
    assert tok.pad_token_id != tok.eos_token_id  # its own pad: no fallback needed
    # cached under <cache_dir>/tokenizers
    assert any(p.name.startswith("default-bpe-") for p in (tmp_path / "tokenizers").iterdir())


def test_local_tokenizer_pad_falls_back_to_eos(tmp_path: Path, default_tokenizer) -> None:
    d = tmp_path / "tok"
    default_tokenizer.save_pretrained(str(d))
    # rewrite it without a pad token
    saved = PreTrainedTokenizerFast.from_pretrained(str(d))
    saved.pad_token = None
    saved.save_pretrained(str(d))
    assert PreTrainedTokenizerFast.from_pretrained(str(d)).pad_token is None

    tok = load_tokenizer(ModelSection(architecture="tiny", tokenizer=str(d)), tmp_path / "cache")
    assert tok.get_vocab() == default_tokenizer.get_vocab()
    assert tok.eos_token == EOS_TOKEN
    assert tok.pad_token == tok.eos_token and tok.pad_token_id == tok.eos_token_id
    # with no model.tokenizer, the model's own directory is used
    tok2 = load_tokenizer(ModelSection(name_or_path=str(d)), tmp_path / "cache")
    assert tok2.pad_token_id == tok2.eos_token_id == default_tokenizer.eos_token_id


def test_local_tokenizer_keeps_its_pad(tmp_path: Path, default_tokenizer) -> None:
    d = tmp_path / "tok"
    default_tokenizer.save_pretrained(str(d))
    tok = load_tokenizer(ModelSection(name_or_path=str(d)), tmp_path / "cache")
    assert tok.pad_token == PAD_TOKEN and tok.pad_token_id == default_tokenizer.pad_token_id


def test_tokenizer_without_pad_or_eos(tmp_path: Path) -> None:
    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    d = tmp_path / "bare-tok"
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(str(d))
    with pytest.raises(ConfigError, match="has neither a pad nor an eos token"):
        load_tokenizer(ModelSection(name_or_path=str(d)), tmp_path / "cache")


# --------------------------------------------------------------------------------------------
# model_config / build_model from a local directory


def test_model_config_from_local_dir(saved_model) -> None:
    d, _ = saved_model
    cfg = model_config(ModelSection(name_or_path=str(d)), vocab_size=10_000)
    assert cfg.model_type == "qwen2"
    for key, value in TINY_QWEN2.items():
        assert getattr(cfg, key) == value, key  # the saved config, not resized to the tokenizer


def test_build_model_loads_saved_weights(saved_model) -> None:
    d, state = saved_model
    section = ModelSection(name_or_path=str(d))
    cfg = model_config(section, vocab_size=96)
    for seed in (0, 99):  # the seed does not matter for pretrained weights
        model = build_model(section, cfg, seed=seed)
        assert isinstance(model, Qwen2ForCausalLM)
        loaded = model.state_dict()
        assert loaded.keys() == state.keys()
        for k, v in state.items():
            assert loaded[k].dtype == torch.float32
            assert torch.equal(loaded[k], v), k
        assert model.config.use_cache is False


@pytest.mark.parametrize("sub", ["missing", "empty-dir"])
def test_unreadable_model_path(tmp_path: Path, sub: str) -> None:
    path = tmp_path / sub
    if sub == "empty-dir":
        path.mkdir()
    with pytest.raises(ConfigError) as e:
        model_config(ModelSection(name_or_path=str(path)), vocab_size=100)
    assert str(e.value).startswith("model.name_or_path: cannot read a model config from")
    assert str(path) in str(e.value)


# --------------------------------------------------------------------------------------------
# architecture_config / random init


@pytest.mark.parametrize("vocab", [1, 63, 64, 65, 512, 4096, 4097, 5000])
def test_tiny_vocab_grows_to_multiple_of_64(vocab: int) -> None:
    cfg = architecture_config("tiny", vocab)
    assert cfg.vocab_size % 64 == 0
    assert vocab <= cfg.vocab_size < vocab + 64
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers) == (128, 4, 4)


@pytest.mark.parametrize(
    ("vocab", "expected"), [(4096, 151936), (151665, 151936), (151936, 151936), (152001, 152064)]
)
def test_qwen25_05b_shape(vocab: int, expected: int) -> None:
    cfg = architecture_config("qwen2.5-0.5b", vocab)
    assert cfg.vocab_size == expected
    assert cfg.num_attention_heads == 14 and cfg.num_key_value_heads == 2
    assert cfg.hidden_size == 896 and cfg.num_hidden_layers == 24 and cfg.tie_word_embeddings is True
    check_tp_heads(2, cfg.num_attention_heads, cfg.num_key_value_heads)
    with pytest.raises(ConfigError):
        check_tp_heads(4, cfg.num_attention_heads, cfg.num_key_value_heads)


def test_qwen2_7b_shape() -> None:
    cfg = architecture_config("qwen2-7b", 4096)
    assert (cfg.vocab_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (152064, 28, 4)
    check_tp_heads(4, cfg.num_attention_heads, cfg.num_key_value_heads)


def test_every_architecture_has_a_shape() -> None:
    from accel_tp.config import ARCHITECTURES

    for name in ARCHITECTURES:
        cfg = architecture_config(name, 1000)
        assert cfg.hidden_size % cfg.num_attention_heads == 0
        assert cfg.num_attention_heads % cfg.num_key_value_heads == 0


def test_model_config_for_architecture() -> None:
    section = ModelSection(architecture="tiny", tokenizer="default")
    assert model_config(section, 4097).to_dict() == architecture_config("tiny", 4097).to_dict()


def test_build_model_same_seed_same_weights() -> None:
    section = ModelSection(architecture="tiny", tokenizer="default", attn_implementation="eager")
    a = build_model(section, model_config(section, 300), seed=5)
    torch.rand(1000)  # global RNG state differs between the two builds
    b = build_model(section, model_config(section, 300), seed=5)
    c = build_model(section, model_config(section, 300), seed=6)
    assert same_weights(a, b)
    assert not same_weights(a, c)
    assert a.config.vocab_size == 320
    assert a.get_input_embeddings().weight.shape == (320, 128)
    assert next(a.parameters()).dtype == torch.float32
    assert a.config.use_cache is False
    assert a.config._attn_implementation == "eager"


# --------------------------------------------------------------------------------------------
# the fused-loss forward (Liger's kernel is GPU-only; here a plain-torch stand-in with its signature)


def _unfused_loss(h, w, target, bias=None, reduction="mean", accum_dtype=None, chunk_mem_const=1):
    assert accum_dtype is torch.float32  # the lm_head gradient must be summed in fp32
    logits = h.float() @ w.float().T + (0 if bias is None else bias.float())
    return torch.nn.functional.cross_entropy(logits, target, ignore_index=-100, reduction=reduction)


@pytest.mark.parametrize("num_items", [None, 7.0])
def test_fused_loss_forward_matches_hf_loss(num_items: float | None) -> None:
    """Same loss and gradients as Hugging Face's own causal-LM loss: shifted labels, -100
    ignored, per-token sum / num_items_in_batch (or the mean), packed-row position_ids passed on."""
    from accel_tp.parallelize import _fused_loss_forward

    torch.manual_seed(0)
    cfg = Qwen2Config(**{**TINY_QWEN2, "tie_word_embeddings": True})
    ref = Qwen2ForCausalLM(cfg)
    fused = Qwen2ForCausalLM(cfg)
    fused.load_state_dict(ref.state_dict())
    fused.forward = _fused_loss_forward(fused, _unfused_loss)
    ids = torch.randint(0, 96, (2, 12))
    labels = ids.clone()
    labels[0, :3] = -100
    labels[1, 9:] = -100
    # Two packed documents in row 0.
    pos = torch.cat([torch.arange(5), torch.arange(7)]).repeat(2, 1)
    kw = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    want = ref(input_ids=ids, labels=labels, position_ids=pos, use_cache=False, **kw)
    got = fused(input_ids=ids, labels=labels, position_ids=pos, use_cache=False, **kw)
    assert got.logits is None  # the point: no (tokens x vocab) logits kept
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-6, atol=0)
    want.loss.backward()
    got.loss.backward()
    for (name, a), b in zip(ref.named_parameters(), fused.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=name)
    # Without labels (generation, logits wanted) the model's own forward runs.
    out = fused(input_ids=ids, use_cache=False)
    torch.testing.assert_close(out.logits, ref(input_ids=ids, use_cache=False).logits)
    # So it does in eval mode with labels: evaluation and the export's check read the logits.
    fused.eval()
    ref.eval()
    with torch.no_grad():
        out = fused(input_ids=ids, labels=labels, position_ids=pos, use_cache=False, **kw)
        want = ref(input_ids=ids, labels=labels, position_ids=pos, use_cache=False, **kw)
    torch.testing.assert_close(out.logits, want.logits)
    torch.testing.assert_close(out.loss, want.loss)


# --------------------------------------------------------------------------------------------
# attention kernel: transformers' choice by default, a requested one checked against the class


def test_attn_default_lets_transformers_choose(saved_model) -> None:
    d, _ = saved_model
    section = ModelSection(name_or_path=str(d))
    assert section.attn_implementation is None
    model = build_model(section, model_config(section, 96), seed=0)
    assert model.config._attn_implementation == "sdpa"  # what transformers picks for Qwen2 on CPU


def test_attn_default_for_a_model_without_sdpa(tmp_path: Path) -> None:
    """Gemma-2 has no SDPA path: left to transformers it gets eager (an sdpa default failed here)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from accel_tp.model import supported_attn_implementations

    cfg = Gemma2Config(**{**TINY_QWEN2, "head_dim": 8, "pad_token_id": 0})
    Gemma2ForCausalLM(cfg).save_pretrained(tmp_path / "g2")
    section = ModelSection(name_or_path=str(tmp_path / "g2"))
    model = build_model(section, model_config(section, 96), seed=0)
    assert model.config._attn_implementation == "eager"
    assert "sdpa" not in supported_attn_implementations(cfg)
    with pytest.raises(ConfigError) as e:
        build_model(ModelSection(name_or_path=str(tmp_path / "g2"), attn_implementation="sdpa"), cfg, seed=0)
    assert str(e.value) == (
        "model.attn_implementation: the Gemma2 model does not support 'sdpa'; it supports "
        "['eager', 'flex_attention', 'flash_attention_2']. Set one of those, or remove the key to let "
        "transformers choose."
    )


def test_attn_explicit_choices_still_accepted() -> None:
    """GPU configs set sdpa / flex_attention explicitly: Qwen2 supports every kernel."""
    from accel_tp.model import check_attn_implementation, supported_attn_implementations

    cfg = architecture_config("tiny", 300)
    assert supported_attn_implementations(cfg) == ["eager", "sdpa", "flex_attention", "flash_attention_2"]
    for attn in ("sdpa", "flex_attention", "flash_attention_2", "eager", None):
        check_attn_implementation(
            ModelSection(architecture="tiny", tokenizer="default", attn_implementation=attn), cfg
        )
