"""The vocabulary-parallel cross-entropy (accel_tp/vocab_parallel.py): parity, memory, training.

Parity, on 2 gloo processes in fp32 (tests/workers/vocab_parallel_e2e.py parity): each rank's loss
and gradients (hidden states, its head rows, the layer before, the bias) against torch's
cross_entropy on the whole logits, untied and tied (through a vocab-split embedding sharing the
head's rows), chunked and not, an even and an uneven split. Bound: 1e-6 relative (of the largest
gradient element). The plain fp32 loss is itself up to 7e-7 from the fp64 one on these shapes, so
two correct fp32 computations can differ by about that; in fp64 ours equals the exact loss to
1e-12, which a wrong formula could not.

Memory: every aten op's output inside the loss's forward and backward is counted; with chunks of
C tokens the largest is one chunk's logits, C x V/tp, and never a rank's [N, V/tp].

Training: tiny Qwen2 models (untied and tied) at tp 2 through Accelerate + DeepSpeed AutoTP for 3
SGD steps: the loss with AutoTP's vocab-split head (`tensor_parallel.vocab_parallel_lm_head`) and
our forward, at ZeRO-1 and ZeRO-3, against the whole-vocabulary default path: losses within 1e-6
relative, trained weights within 1e-6 while training moved them by more than 0.05.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from accel_tp.vocab_parallel import IGNORE_INDEX, vocab_parallel_cross_entropy

from .mp_utils import ROOT, torchrun

WORKER = ROOT / "tests" / "workers" / "vocab_parallel_e2e.py"
RTOL = 1e-6


@pytest.fixture(scope="module")
def parity_report(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("vocab-parallel") / "parity.json"
    proc = torchrun(2, WORKER, ["parity", str(out)])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return json.loads(out.read_text())


def test_parity_with_the_plain_loss(parity_report):
    assert len(parity_report) == 2
    for rank in parity_report:
        assert len(rank["cases"]) == 16  # 2 splits x tied/untied x bias or not x chunked or not
        for case in rank["cases"]:
            quantities = ["loss", "grad_hidden", "grad_weight", "grad_a"] + (
                ["grad_bias"] if case["bias"] else []
            )
            for q in quantities:
                err = case[q]
                assert err["ours_vs_plain"] <= RTOL, (case["vocab"], case["tied"], case["chunk"], q, err)
                assert err["ours64_vs_exact"] <= 1e-12, (case["vocab"], case["tied"], case["chunk"], q, err)
        assert max(rank["mean"]) <= RTOL  # the mean over labelled tokens, unshifted labels


def test_no_rank_materialises_its_whole_vocabulary_slice(parity_report):
    for rank in parity_report:
        shape = rank["memory_shape"]
        n, local, chunk = shape["tokens"], shape["local_vocab"], shape["chunk"]
        assert shape["hidden"] * n < chunk * local  # so the logits are the largest tensor there is
        chunked, whole = rank["memory_chunked"], rank["memory_whole"]
        assert chunked["forward"] == [chunk * local, [chunk, local]]
        assert chunked["backward"][0] < chunk * local
        # Without chunks the counter sees the whole slice's logits: it does see them.
        assert whole["forward"] == [n * local, [n, local]]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    root = tmp_path_factory.mktemp("vocab-parallel-models")
    dirs = []
    for tied in (False, True):
        torch.manual_seed(0)
        config = Qwen2Config(
            vocab_size=250,  # 125 rows per rank
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=tied,
        )
        path = root / ("qwen2-tied" if tied else "qwen2-untied")
        Qwen2ForCausalLM(config).save_pretrained(path)
        dirs.append(path)
    return dirs


def test_training_at_tp2_matches_the_whole_vocabulary_loss(tmp_path, models):
    out = tmp_path / "train.json"
    proc = torchrun(2, WORKER, ["train", str(out), *map(str, models)])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    ranks = json.loads(out.read_text())
    for name, tied in (("qwen2-untied", False), ("qwen2-tied", True)):
        arms = ranks[0][name]
        default = arms["default"]
        assert default["head"] is None and default["embedding"] == "Embedding" and default["tied"] == tied
        assert default["weights_moved"] > 0.05
        for arm in ("ours", "deepspeed", "ours_zero3"):
            got = arms[arm]
            assert got["head"] == ["VocabParallelLinear", [125, 32]], (name, arm)
            assert got["embedding"] == ("VocabParallelEmbedding" if tied else "Embedding"), (name, arm)
            assert got["tied"] == tied
            assert got["losses"] == pytest.approx(default["losses"], rel=RTOL), (name, arm)
            assert got["weights_max_abs_diff"] <= 1e-6, (name, arm, got["weights_max_abs_diff"])
        assert arms["ours_zero3"]["head_zero3"] == [True, 0]  # partitioned: read through ZeRO-3's gather
        for arm in arms:  # the TP peers agree
            assert ranks[1][name][arm]["losses"] == arms[arm]["losses"]


def _hf_case(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 10, 8, generator=g)
    weight = torch.randn(30, 8, generator=g)
    labels = torch.randint(0, 30, (3, 10), generator=g)
    labels[0, :4] = IGNORE_INDEX
    return hidden, weight, labels


@pytest.mark.parametrize("num_items", [None, 17.0])
def test_single_process_equals_hugging_faces_causal_lm_loss(num_items):
    """Without a group: transformers' own ForCausalLMLoss (the shift, -100, num_items_in_batch;
    it upcasts the logits to fp32, so fp32 here)."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    hidden, weight, labels = _hf_case()
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ours = vocab_parallel_cross_entropy(h1, w1, labels, num_items_in_batch=num_items, chunk_tokens=4)
    ours.backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = ForCausalLMLoss(h2 @ w2.t(), labels, vocab_size=30, num_items_in_batch=num_items)
    ref.backward()
    torch.testing.assert_close(ours, ref, rtol=RTOL, atol=0)
    for got, want in ((h1.grad, h2.grad), (w1.grad, w2.grad)):
        assert float((got - want).abs().max() / want.abs().max()) <= RTOL


def test_refusals():
    hidden, weight, labels = _hf_case()
    with pytest.raises(ValueError, match="chunk_tokens must be positive"):
        vocab_parallel_cross_entropy(hidden, weight, labels, chunk_tokens=0)
    with pytest.raises(ValueError, match="30 hidden rows but 27 labels"):
        vocab_parallel_cross_entropy(hidden, weight, labels[:, :9])
    h = hidden.clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(h, weight, labels)
    loss.backward(retain_graph=True)
    # Its gradients are scaled in place, so a second backward would be wrong: it is refused.
    with pytest.raises(RuntimeError, match="one backward per forward"):
        loss.backward()


def test_scaled_embeddings_taken_as_gemma3s_are_gemma3s():
    """compat.deepspeed.SCALED_AS_GEMMA3 classes take Gemma-3's class (the one DeepSpeed splits by
    vocabulary): their forward and constructor are Gemma-3's, line for line."""
    import importlib
    import inspect

    from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding

    from accel_tp.compat.deepspeed import SCALED_AS_GEMMA3

    def body(fn: object) -> list[str]:
        return [ln.strip() for ln in inspect.getsource(fn).splitlines()[1:]]

    for module, name in SCALED_AS_GEMMA3:
        cls = getattr(importlib.import_module(module), name)
        assert body(cls.forward) == body(Gemma3TextScaledWordEmbedding.forward), name
        assert body(cls.__init__) == body(Gemma3TextScaledWordEmbedding.__init__), name


def test_a_tied_embedding_deepspeed_cannot_split_is_a_config_error():
    """A tied embedding with its own forward: DeepSpeed 0.19.8 cannot split it by vocabulary
    (VocabParallelEmbedding.validate_embedding); the run refuses before AutoTP, naming the setting."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from accel_tp.config import ConfigError, config_from_dict
    from accel_tp.parallelize import prepare_vocabulary_split

    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
        )
    )  # fmt: skip

    class Custom(torch.nn.Embedding):
        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return super().forward(ids) * 2

    model.get_input_embeddings().__class__ = Custom
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    cfg = config_from_dict(
        {"model": {"architecture": "tiny", "tokenizer": "default"}, "parallelism": {"tp_size": 2}}
    )
    with pytest.raises(
        ConfigError, match="parallelism.vocab_parallel_loss: the 'llama' model's embedding is tied"
    ):
        prepare_vocabulary_split(model, cfg)
    off = config_from_dict(
        {
            "model": {"architecture": "tiny", "tokenizer": "default"},
            "parallelism": {"tp_size": 2, "vocab_parallel_loss": False},
        }
    )
    prepare_vocabulary_split(model, off)  # the head gathered: nothing to split
