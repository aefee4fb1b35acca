"""The conversation set shipped with accel-tp (accel_tp/assets/default_conversations.jsonl.gz).

It is generated, not collected: `make_conversations()` below writes it (deterministic), so its
provenance is this file. Rewrite it with:

    python -c "from tests.test_chat_assets import write; write()"
"""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

ASSET = Path(__file__).resolve().parents[1] / "accel_tp" / "assets" / "default_conversations.jsonl.gz"
N = 800

WORDS = [
    "apple",
    "river",
    "stone",
    "garden",
    "window",
    "planet",
    "yellow",
    "silver",
    "market",
    "candle",
    "forest",
    "winter",
    "summer",
    "button",
    "pencil",
    "rocket",
    "castle",
    "dragon",
    "bridge",
    "island",
    "meadow",
    "pocket",
    "rabbit",
    "ticket",
    "violin",
    "wallet",
    "basket",
    "copper",
    "honey",
    "jungle",
    "lemon",
    "mirror",
    "noodle",
    "orange",
    "parrot",
    "puzzle",
    "saddle",
    "tomato",
    "tunnel",
    "velvet",
    "wizard",
    "anchor",
    "beacon",
    "cactus",
    "dolphin",
    "engine",
    "falcon",
    "guitar",
    "harbor",
    "igloo",
    "jacket",
    "kettle",
    "ladder",
    "magnet",
    "needle",
    "oyster",
    "pillow",
    "quartz",
    "ribbon",
]
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
SYSTEMS = (
    "You are a helpful assistant.",
    "You are a concise assistant. Answer in one sentence.",
    "You are a patient tutor who explains simple things clearly.",
)


def _turn(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(6)
    if kind == 0:
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    if kind == 1:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return f"What is {a} times {b}?", f"{a} times {b} is {a * b}."
    w = rng.choice(WORDS)
    if kind == 2:
        return f"How many letters does the word '{w}' have?", f"The word '{w}' has {len(w)} letters."
    if kind == 3:
        return f"Spell '{w}' backwards.", f"'{w}' backwards is '{w[::-1]}'."
    if kind == 4:
        return f"Write '{w}' in capital letters.", f"In capital letters: {w.upper()}."
    d = rng.randrange(7)
    return f"Which day comes after {DAYS[d]}?", f"The day after {DAYS[d]} is {DAYS[(d + 1) % 7]}."


def make_conversations(n: int = N, seed: int = 0) -> list[dict]:
    """n conversations: one to three user/assistant exchanges, a system prompt in about 40 %."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        messages = []
        if rng.random() < 0.4:
            messages.append({"role": "system", "content": rng.choice(SYSTEMS)})
        for _ in range(rng.choice((1, 1, 2, 3))):
            question, answer = _turn(rng)
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        out.append({"messages": messages})
    return out


def _serialise(rows: list[dict]) -> bytes:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return gzip.compress(text.encode("utf-8"), mtime=0)


def write() -> None:
    ASSET.write_bytes(_serialise(make_conversations()))


def test_shipped_set_is_the_generated_one():
    assert gzip.decompress(ASSET.read_bytes()) == gzip.decompress(_serialise(make_conversations()))


def test_shipped_set_loads_and_has_every_shape():
    from accel_tp.chat import check_conversation, load_default_conversations

    convs = load_default_conversations()
    assert len(convs) == N
    for i, c in enumerate(convs):
        check_conversation(c, f"conversation {i}")
    assert any(c[0]["role"] == "system" for c in convs) and any(c[0]["role"] == "user" for c in convs)
    assert any(sum(m["role"] == "assistant" for m in c) == 3 for c in convs)  # multi-turn
