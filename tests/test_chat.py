"""Chat data (data.format: chat): label masks token by token, refusals, truncation, packing, loss.

The tokenizers are local: the embedded BPE with each family's special tokens added and a chat
template set (Qwen2.5's ChatML template, Llama-3's, and a ChatML template with generation
markers), saved with save_pretrained and loaded back as a user's model.tokenizer folder would be.
The expected ids and labels are built piece by piece from each template's documented format, not
by the code under test.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch

from accel_tp.chat import IGNORE, check_conversation, encode_conversation
from accel_tp.config import ConfigError, DataSection, ModelSection, config_from_dict
from accel_tp.data import (
    build_rows,
    cache_key,
    check_data_sources,
    data_fingerprint,
    make_collate,
    pack_rows,
    tokenize_chat_dataset,
)
from accel_tp.model import architecture_config, build_model, load_tokenizer

# Qwen2.5-Instruct's chat template (tools branch included), as its tokenizer_config.json ships it.
QWEN25 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# Meta-Llama-3-Instruct's chat template.
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# ChatML whose assistant turns are wrapped in generation markers (content and <|im_end|>).
CHATML_GENERATION = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}{% generation %}{{- message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{{- '\\n' }}{%- else %}{{- message['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

FAMILIES = {
    "qwen2.5": (QWEN25, {"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}),
    "llama3": (
        LLAMA3,
        {
            "bos_token": "<|begin_of_text|>",
            "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        },
    ),
    "generation": (CHATML_GENERATION, {"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}),
}

SYSTEM = {"role": "system", "content": "You answer briefly."}
TURNS = [
    {"role": "user", "content": "What is 2 plus 3?"},
    {"role": "assistant", "content": "2 plus 3 is 5."},
    {"role": "user", "content": "And 4 times 6?"},
    {"role": "assistant", "content": "4 times 6 is 24."},
]


def make_chat_tokenizer(base: object, folder: Path, family: str) -> Path:
    """A local tokenizer folder: the embedded BPE plus the family's special tokens and template."""
    from transformers import PreTrainedTokenizerFast

    template, specials = FAMILIES[family]
    tok = PreTrainedTokenizerFast.from_pretrained(base.name_or_path)
    tok.add_special_tokens(specials)
    tok.chat_template = template
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def chat_tokenizers(default_tokenizer, tmp_path_factory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("chat-tokenizers")
    return {
        family: load_tokenizer(
            ModelSection(
                architecture="tiny",
                tokenizer=str(make_chat_tokenizer(default_tokenizer, root / family, family)),
            ),
            root,
        )
        for family in FAMILIES
    }


def expected(tok: object, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """Ids and labels from (text, labelled) pieces, each tokenized on its own."""
    ids, labels = [], []
    for text, labelled in pieces:
        part = tok(text, add_special_tokens=False)["input_ids"]
        ids += part
        labels += part if labelled else [IGNORE] * len(part)
    return ids, labels


def chatml_pieces(messages: list[dict], default_system: str | None) -> list[tuple[str, bool]]:
    pieces = []
    if messages[0]["role"] != "system" and default_system is not None:
        pieces.append((f"<|im_start|>system\n{default_system}<|im_end|>\n", False))
    for m in messages:
        if m["role"] == "assistant":
            pieces += [
                ("<|im_start|>assistant\n", False),
                (m["content"], True),
                ("<|im_end|>", True),
                ("\n", False),
            ]
        else:
            pieces.append((f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n", False))
    return pieces


def llama3_pieces(messages: list[dict]) -> list[tuple[str, bool]]:
    pieces = [("<|begin_of_text|>", False)]
    for m in messages:
        head = f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n"
        if m["role"] == "assistant":
            pieces += [(head, False), (m["content"], True), ("<|eot_id|>", True)]
        else:
            pieces.append((head + m["content"] + "<|eot_id|>", False))
    return pieces


PIECES = {
    "qwen2.5": lambda msgs: chatml_pieces(msgs, QWEN_DEFAULT_SYSTEM),
    "llama3": llama3_pieces,
    "generation": lambda msgs: chatml_pieces(msgs, None),
}


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("system", [True, False], ids=["system", "no-system"])
@pytest.mark.parametrize("turns", [1, 2], ids=["one-turn", "multi-turn"])
def test_labels_token_by_token(chat_tokenizers, family, system, turns):
    tok = chat_tokenizers[family]
    messages = ([SYSTEM] if system else []) + TURNS[: 2 * turns]
    want_ids, want_labels = expected(tok, PIECES[family](messages))
    # The pieces tokenize like the whole rendering: the expectation is about this very template.
    assert want_ids == tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    ids, labels = encode_conversation(messages, tok, "assistant")
    assert ids == want_ids
    assert labels == want_labels
    # Read back: exactly the assistant contents and their end-of-turn markers, nothing else.
    marker = "<|eot_id|>" if family == "llama3" else "<|im_end|>"
    labelled = tok.decode([t for t in labels if t != IGNORE])
    assert labelled == "".join(m["content"] + marker for m in messages if m["role"] == "assistant")


def test_loss_on_all_labels_every_token(chat_tokenizers):
    tok = chat_tokenizers["qwen2.5"]
    ids, labels = encode_conversation([SYSTEM, *TURNS], tok, "all")
    assert labels == ids and ids == tok.apply_chat_template([SYSTEM, *TURNS], return_dict=True)["input_ids"]


# A template that numbers the turns up front: a prefix renders a different first line than the
# whole, so prefixes are not token prefixes.
COUNTING = (
    "{{ messages | length }} messages\n{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)
# The generation prompt ends in a space, which the BPE merges with the reply's first word.
TRAILING_SPACE = (
    "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)


@pytest.mark.parametrize("template", [COUNTING, TRAILING_SPACE], ids=["counting", "trailing-space"])
def test_template_whose_prefixes_are_not_token_prefixes_is_refused(default_tokenizer, template):
    tok = default_tokenizer.__class__.from_pretrained(default_tokenizer.name_or_path)
    tok.chat_template = template
    with pytest.raises(ConfigError, match=r"model.chat_template: .* not a token prefix .*generation"):
        encode_conversation(TURNS, tok, "assistant", "conversation 7")
    # With every token labelled no span is needed: the same template is fine.
    ids, labels = encode_conversation(TURNS, tok, "all")
    assert ids == labels


def test_bad_conversations_name_the_field():
    with pytest.raises(ConfigError, match=r"data.messages_field: row 3 message 1 has role 'tool'"):
        check_conversation([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}], "row 3")
    with pytest.raises(ConfigError, match=r"data.messages_field: row 1 holds str"):
        check_conversation("hello", "row 1")
    with pytest.raises(ConfigError, match=r"message 0 .*content of type list"):
        check_conversation([{"role": "user", "content": [{"type": "text"}]}], "row 1")
    with pytest.raises(ConfigError, match=r"message 0 is not a \{role, content\} message"):
        check_conversation([{"role": "user"}], "row 1")


def _chat_ds(convs: list[list[dict]]) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"messages": convs})


def test_truncation_and_drop_counts(chat_tokenizers):
    tok = chat_tokenizers["generation"]
    long_prompt = [{"role": "user", "content": "word " * 80}, {"role": "assistant", "content": "ok."}]
    no_assistant = [{"role": "user", "content": "hello"}]
    short = TURNS[:2]
    long_answer = [TURNS[0], {"role": "assistant", "content": "five " * 80}]
    ds, stats = tokenize_chat_dataset(
        _chat_ds([short, long_prompt, no_assistant, long_answer]), tok, 48, "assistant"
    )
    assert stats == {"conversations": 4, "truncated": 1, "dropped": 2}
    assert len(ds) == 2
    full_ids, full_labels = encode_conversation(long_answer, tok, "assistant")
    assert ds[1]["input_ids"] == full_ids[:48] and ds[1]["labels"] == full_labels[:48]  # the tail is cut
    assert ds[0]["input_ids"] == encode_conversation(short, tok, "assistant")[0]


def test_build_rows_logs_the_counts_once(chat_tokenizers, tmp_path, capsys):
    path = tmp_path / "c.jsonl"
    rows = [{"messages": TURNS}, {"messages": [{"role": "user", "content": "x"}]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    section = DataSection(source="files", files=[str(path)], format="chat", seq_length=256)
    ds = build_rows(section, chat_tokenizers["qwen2.5"])
    lines = [line for line in capsys.readouterr().out.splitlines() if "chat data" in line]
    assert lines == [
        "[accel-tp] chat data (train): 2 conversations, 0 truncated to data.seq_length 256, 1 dropped "
        "(no assistant token with a label left)"
    ]
    assert len(ds) == 1 and set(ds.column_names) == {"input_ids", "labels"}


def test_document_packing_keeps_labels_with_their_tokens():
    docs = [[1, 2, 3], [4, 5, 6, 7, 8], [9, 10]]
    labels = [[-100, 2, 3], [-100, -100, 6, 7, -100], [-100, 10]]
    out = pack_rows(docs, "document", 8, labels)
    assert set(out) == {"input_ids", "position_ids", "labels"}
    pairs = sorted((t, lab) for r, ls in zip(out["input_ids"], out["labels"]) for t, lab in zip(r, ls))
    assert pairs == sorted((t, lab) for d, ls in zip(docs, labels) for t, lab in zip(d, ls))
    assert all(
        len(r) == len(ls) == len(p) for r, ls, p in zip(out["input_ids"], out["labels"], out["position_ids"])
    )


@pytest.mark.parametrize("packing", ["none", "document"])
def test_collate_keeps_chat_labels_and_counts_only_them(packing):
    rows = [
        {"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]},
        {"input_ids": [9, 10, 11], "labels": [-100, 10, -100]},
    ]
    if packing == "document":  # both conversations in one row
        packed = pack_rows([r["input_ids"] for r in rows], "document", 16, [r["labels"] for r in rows])
        rows = [{k: v[0] for k, v in packed.items()}]
        assert len(packed["input_ids"]) == 1
    batch = make_collate(1, "longest", 16, packing)(rows)
    assert int(batch.label_tokens) == 3  # 7, 8, 10: the labelled tokens only
    assert sorted(t for t in batch["labels"].flatten().tolist() if t != -100) == [7, 8, 10]
    assert int(batch.real_tokens) == 7


def test_packed_chat_batch_loss_equals_one_by_one(chat_tokenizers):
    """fp32, CPU: a document-packed chat batch's loss (mean over labelled tokens) equals the same
    conversations run one at a time."""
    tok = chat_tokenizers["qwen2.5"]
    convs = [
        TURNS[:2],
        [SYSTEM, *TURNS],
        TURNS[2:4],
        [SYSTEM, TURNS[0], {"role": "assistant", "content": "Five."}],
    ]
    ds, _ = tokenize_chat_dataset(_chat_ds(convs), tok, 512, "assistant")
    section = ModelSection(architecture="tiny", tokenizer="default", attn_implementation="sdpa")
    model = build_model(section, architecture_config("tiny", len(tok)), seed=0).eval()
    packed = pack_rows(ds["input_ids"], "document", 256, ds["labels"])
    assert len(packed["input_ids"]) < len(convs), "the test must pack conversations together"
    rows = [dict(zip(packed, values)) for values in zip(*packed.values())]
    batch = make_collate(tok.pad_token_id, "longest", 256, "document")(rows)
    n_packed = int(batch.label_tokens)
    with torch.no_grad():
        packed_loss = model(**batch.inputs).loss.item()
        total, count = 0.0, 0
        for ids, labels in zip(ds["input_ids"], ds["labels"]):
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
            target = torch.tensor(labels[1:])
            total += torch.nn.functional.cross_entropy(
                logits, target, ignore_index=-100, reduction="sum"
            ).item()
            count += int((target != -100).sum())
    assert n_packed == count
    assert packed_loss == pytest.approx(total / count, rel=1e-5)
    # Labelling every token gives another loss: the mask is what the loss is taken over.
    all_batch = make_collate(tok.pad_token_id, "longest", 256, "document")(
        [{"input_ids": r, "position_ids": p} for r, p in zip(packed["input_ids"], packed["position_ids"])]
    )
    with torch.no_grad():
        all_loss = model(**all_batch.inputs).loss.item()
    assert all_loss != pytest.approx(total / count, rel=1e-3)


# ----------------------------------------------------------------------------------- bad input


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_check_data_sources_chat_rows(tmp_path):
    good = {"messages": TURNS}
    files = {
        "no-field": ([good, {"text": "hi"}], r"data.messages_field: .*row 2 has no 'messages' field"),
        "bad-role": (
            [good, {"messages": [{"role": "robot", "content": "x"}]}],
            r"data.messages_field: .*row 2 message 0 has role 'robot'",
        ),
    }
    for name, (rows, pattern) in files.items():
        section = DataSection(
            source="files", files=[str(_jsonl(tmp_path / f"{name}.jsonl", rows))], format="chat"
        )
        with pytest.raises(ConfigError, match=pattern):
            check_data_sources(section)
    check_data_sources(
        DataSection(source="files", files=[str(_jsonl(tmp_path / "ok.jsonl", [good]))], format="chat")
    )
    txt = tmp_path / "a.txt"
    txt.write_text("hello\n")
    with pytest.raises(ConfigError, match=r"data.files: data.format: chat reads conversations from .jsonl"):
        check_data_sources(DataSection(source="files", files=[str(txt)], format="chat"))


def test_check_data_sources_chat_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"messages": [TURNS, [{"role": "bot", "content": "x"}]]}), path)
    with pytest.raises(ConfigError, match=r"row 2 message 0 has role 'bot'"):
        check_data_sources(DataSection(source="files", files=[str(path)], format="chat"))


def test_tokenizer_without_template_fails_up_front(default_tokenizer, tmp_path):
    from accel_tp.launch import preflight

    cfg = config_from_dict(
        {
            "model": {"architecture": "tiny", "tokenizer": "default"},
            "data": {"format": "chat", "cache_dir": str(tmp_path)},
        }
    )
    with pytest.raises(ConfigError, match=r"model.chat_template: the tokenizer .* has no chat template"):
        preflight(cfg, world_size=1)
    # model.chat_template (a file here) fixes it, and the tokenizer carries it from then on.
    tpl = tmp_path / "t.jinja"
    tpl.write_text(CHATML_GENERATION)
    cfg.model.chat_template = str(tpl)
    preflight(cfg, world_size=1)
    assert load_tokenizer(cfg.model, tmp_path).chat_template == CHATML_GENERATION


def test_config_errors():
    base = {"model": {"architecture": "tiny", "tokenizer": "default"}}
    cases = [
        ({"data": {"loss_on": "assistant"}}, r"data.loss_on: 'assistant' needs data.format: chat"),
        ({"data": {"format": "chat", "packing": "concat"}}, r"data.packing: 'concat' .* 'document'"),
        ({"data": {"format": "dialogue"}}, r"data.format: must be one of \['text', 'chat'\]"),
        (
            {"model": {**base["model"], "chat_template": "/no/such.jinja"}},
            r"model.chat_template: .* neither a Jinja",
        ),
    ]
    for extra, pattern in cases:
        with pytest.raises(ConfigError, match=pattern):
            config_from_dict({**base, **extra})
    cfg = config_from_dict({**base, "data": {"format": "chat"}})
    assert cfg.data.label_mode == "assistant" and DataSection().label_mode == "all"


def test_cache_key_and_fingerprint_see_every_chat_setting(chat_tokenizers, default_tokenizer):
    tok = chat_tokenizers["qwen2.5"]
    chat = DataSection(format="chat")
    keys = {
        cache_key(DataSection(), tok),
        cache_key(chat, tok),
        cache_key(DataSection(format="chat", loss_on="all"), tok),
        cache_key(DataSection(format="chat", messages_field="conversation"), tok),
    }
    assert len(keys) == 4
    other = tok.__class__.from_pretrained(tok.name_or_path)
    other.chat_template = LLAMA3  # same vocabulary, another template
    assert cache_key(chat, other) != cache_key(chat, tok)
    assert data_fingerprint(chat, other, 1, 10) != data_fingerprint(chat, tok, 1, 10)


def test_shipped_set_labels_equal_the_reference_labelling(tmp_path):
    """Every shipped conversation, rendered with the example config's template: the product's
    prefix-diff labels equal tests/reference_chat.py's character-span labels."""
    from accel_tp.chat import load_default_conversations
    from accel_tp.config import load_config

    from .reference_chat import label_by_characters

    cfg = load_config(Path(__file__).resolve().parents[1] / "accelerate_configs" / "sft_tiny_tp2_dp2.yaml")
    tok = load_tokenizer(cfg.model, tmp_path)
    for i, conv in enumerate(load_default_conversations()[:200]):
        assert encode_conversation(conv, tok, "assistant") == label_by_characters(
            tok, conv, tok.eos_token, "assistant"
        ), i


def test_hub_chat_source_with_another_field(chat_tokenizers, tmp_path):
    """A hub dataset (a local folder through datasets' loader) with the messages under another name."""
    hub = tmp_path / "hub-chat"
    hub.mkdir()
    _jsonl(hub / "train.jsonl", [{"conversation": TURNS, "id": 1}, {"conversation": TURNS[:2], "id": 2}])
    section = DataSection(source="hub", name=str(hub), format="chat", messages_field="conversation")
    ds = build_rows(section, chat_tokenizers["llama3"])
    assert ds["input_ids"][0] == encode_conversation(TURNS, chat_tokenizers["llama3"], "assistant")[0]
    with pytest.raises(ConfigError, match=r"data.messages_field: column 'messages' not in the dataset"):
        build_rows(DataSection(source="hub", name=str(hub), format="chat"), chat_tokenizers["llama3"])


def test_no_conversation_left_is_a_clear_error(chat_tokenizers, tmp_path):
    from accel_tp.data import load_or_build_tokenized

    path = _jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "word " * 60}, TURNS[1]]}])
    section = DataSection(
        source="files", files=[str(path)], format="chat", seq_length=16, cache_dir=str(tmp_path)
    )
    with pytest.raises(ConfigError, match=r"no conversation in the 'files' source keeps a labelled token"):
        load_or_build_tokenized(section, chat_tokenizers["qwen2.5"], True, lambda: None)
