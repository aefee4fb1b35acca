"""model.activation_checkpointing: all layers, the first N (selective) or none; gradients unchanged."""

from __future__ import annotations

import pytest
import torch

from accel_tp.config import ConfigError, load_config
from accel_tp.parallelize import checkpointed_layer_count, decoder_layers, enable_activation_checkpointing

from .mp_utils import TINY


def _model(layers: int = 4):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    conf = Qwen2Config(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_implementation="eager",
    )
    return Qwen2ForCausalLM(conf).train()


def _grads_and_forwards(setting: bool | int) -> tuple[dict[str, torch.Tensor], list[int]]:
    """Gradients of one step and how often each decoder layer's forward ran (2: recomputed)."""
    model = _model()
    if setting:
        enable_activation_checkpointing(model, setting)
    calls = [0] * len(decoder_layers(model))
    for i, layer in enumerate(decoder_layers(model)):
        # A pre-hook: the recompute stops early, once the last saved tensor is rebuilt (inside the MLP).
        layer.mlp.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, calls


@pytest.mark.parametrize(("setting", "recomputed"), [(False, 0), (2, 2), (True, 4)])
def test_first_n_layers_are_recomputed_and_gradients_unchanged(setting, recomputed):
    want, _ = _grads_and_forwards(False)
    got, calls = _grads_and_forwards(setting)
    assert calls == [2] * recomputed + [1] * (4 - recomputed)
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=1e-6, atol=1e-7, msg=name)


def test_layer_count_checked_against_the_model():
    assert checkpointed_layer_count(True, 28) == 28
    assert checkpointed_layer_count(False, 28) == 0
    assert checkpointed_layer_count(14, 28) == 14
    with pytest.raises(ConfigError, match=r"model.activation_checkpointing: 30 layers, but the model has 28"):
        checkpointed_layer_count(30, 28)


def test_config_takes_a_bool_or_a_layer_count():
    assert load_config(TINY, ["model.activation_checkpointing=3"]).model.activation_checkpointing == 3
    assert load_config(TINY, ["model.activation_checkpointing=true"]).model.activation_checkpointing is True
    with pytest.raises(ConfigError, match="model.activation_checkpointing: 0 layers"):
        load_config(TINY, ["model.activation_checkpointing=0"])


def test_preflight_refuses_more_layers_than_the_model_has():
    from accel_tp.launch import preflight

    cfg = load_config(TINY, ["model.activation_checkpointing=5"])  # the tiny shape has 4 layers
    with pytest.raises(ConfigError, match="model has 4"):
        preflight(cfg)
