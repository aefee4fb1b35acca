"""Chat data: conversations rendered with a chat template, labels on what the assistant says.

A conversation is a list of {role, content} messages (roles system / user / assistant). It is
rendered with the tokenizer's chat template (`apply_chat_template`, or `model.chat_template`), and
with `data.loss_on: assistant` only the tokens the assistant produces carry a label: the content of
each assistant message and the end-of-turn marker the template writes right after it, not the role
header before it, not the whitespace after the marker, not system or user turns.

Two ways to find those tokens:

* a template with `{% generation %}` ... `{% endgeneration %}` markers: its own spans, through
  `apply_chat_template(return_assistant_tokens_mask=True)`;
* any other template: render the conversation up to each assistant message with the generation
  prompt (A), and up to and including it (B); the assistant's tokens are B's tokens after A's,
  less trailing whitespace tokens. This needs A and B to be token prefixes of the whole rendered
  conversation; a template for which they are not (it renders earlier turns differently once more
  follow, or a boundary merges into one token) is refused, since no span could be trusted.

Knows nothing of ranks or parallelism; imports only the config.
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path
from typing import Any

from .config import ConfigError, is_jinja_template

__all__ = [
    "ROLES",
    "IGNORE",
    "DEFAULT_CONVERSATIONS_PATH",
    "read_chat_template",
    "set_chat_template",
    "check_chat_tokenizer",
    "check_conversation",
    "has_generation_markers",
    "encode_conversation",
    "load_default_conversations",
]

ROLES = ("system", "user", "assistant")
IGNORE = -100  # the label of a token that carries no loss
DEFAULT_CONVERSATIONS_PATH = Path(__file__).resolve().parent / "assets" / "default_conversations.jsonl.gz"
_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")


def read_chat_template(value: str) -> str:
    """The template model.chat_template names: the value itself when it is Jinja, else a file's text."""
    if is_jinja_template(value):
        return value
    path = Path(value).expanduser()
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(
            f"model.chat_template: cannot read {str(path)!r} ({e.strerror or e}); give a Jinja template or "
            "the path of a file holding one."
        ) from e


def set_chat_template(tokenizer: Any, value: str | None) -> None:
    """Give the tokenizer model.chat_template (so rendering and the HF export both use it)."""
    if value is not None:
        tokenizer.chat_template = read_chat_template(value)


def check_chat_tokenizer(tokenizer: Any) -> None:
    """A chat run needs a template: the tokenizer's own or model.chat_template."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ConfigError(
            f"model.chat_template: the tokenizer {name!r} has no chat template, which data.format: chat "
            "needs to render conversations; set model.chat_template to a Jinja template or a file holding one."
        )


def has_generation_markers(template: str) -> bool:
    return bool(_GENERATION.search(template))


def check_conversation(messages: Any, where: str) -> list[dict[str, str]]:
    """The conversation as plain {role, content} dicts, or a ConfigError naming `where` (file, row)."""
    field = "data.messages_field"
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ConfigError(
            f"{field}: {where} holds {type(messages).__name__ if messages is not None else 'null'}"
            f"{' (empty)' if isinstance(messages, (list, tuple)) else ''}, not a list of "
            "{role, content} messages."
        )
    out = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            keys = sorted(m) if isinstance(m, dict) else type(m).__name__
            raise ConfigError(
                f"{field}: {where} message {j} is not a {{role, content}} message (it has {keys})."
            )
        if m["role"] not in ROLES:
            raise ConfigError(
                f"{field}: {where} message {j} has role {m['role']!r}; roles must be one of {list(ROLES)}."
            )
        if not isinstance(m["content"], str):
            raise ConfigError(
                f"{field}: {where} message {j} ({m['role']}) has content of type "
                f"{type(m['content']).__name__}; it must be a string."
            )
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _render(tokenizer: Any, messages: list[dict], generation_prompt: bool = False, mask: bool = False) -> Any:
    return tokenizer.apply_chat_template(
        messages,
        tokenize=True,
        return_dict=True,
        add_generation_prompt=generation_prompt,
        return_assistant_tokens_mask=mask,
    )


def encode_conversation(
    messages: list[dict[str, str]], tokenizer: Any, loss_on: str, where: str = "a conversation"
) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and their labels (IGNORE where no loss); `where`
    names the row in errors. The template is the tokenizer's (model.chat_template set it)."""
    try:
        if loss_on == "all":
            ids = list(_render(tokenizer, messages)["input_ids"])
            return ids, list(ids)
        if has_generation_markers(tokenizer.get_chat_template()):
            out = _render(tokenizer, messages, mask=True)
            ids = list(out["input_ids"])
            return ids, [t if m else IGNORE for t, m in zip(ids, out["assistant_masks"])]
        return _diff_labels(messages, tokenizer, where)
    except ConfigError:
        raise
    except Exception as e:  # Jinja raises its own types (e.g. a template refusing a role order)
        raise ConfigError(
            f"model.chat_template: rendering {where} failed ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else e!r})."
        ) from e


def _diff_labels(messages: list[dict[str, str]], tokenizer: Any, where: str) -> tuple[list[int], list[int]]:
    full = list(_render(tokenizer, messages)["input_ids"])
    labels = [IGNORE] * len(full)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if i == 0:
            raise ConfigError(
                f"data.messages_field: {where} starts with an assistant message; without a template "
                "with {% generation %} markers its span cannot be found. Start conversations with a system "
                "or user message."
            )
        head = list(_render(tokenizer, messages[:i], generation_prompt=True)["input_ids"])
        turn = list(_render(tokenizer, messages[: i + 1])["input_ids"])
        if len(head) > len(turn) or full[: len(head)] != head or full[: len(turn)] != turn:
            raise ConfigError(
                f"model.chat_template: for {where} the chat template's rendering up to message "
                f"{i} is not a token prefix of the whole conversation, so the assistant's tokens cannot be "
                "found by rendering growing prefixes. Use a template with {% generation %} markers, or "
                "data.loss_on: all."
            )
        end = len(turn)
        # The whitespace a template writes after the end-of-turn marker is not the assistant's.
        while end > len(head) and not tokenizer.decode([full[end - 1]]).strip():
            end -= 1
        labels[len(head) : end] = full[len(head) : end]
    return full, labels


def load_default_conversations() -> list[list[dict[str, str]]]:
    """The conversation set shipped with accel-tp (data.source: embedded, data.format: chat)."""
    with gzip.open(DEFAULT_CONVERSATIONS_PATH, "rt", encoding="utf-8") as f:
        return [json.loads(line)["messages"] for line in f if line.strip()]
