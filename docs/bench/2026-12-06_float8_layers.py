"""Float8 (torchao) vs bf16 for one compiled decoder layer, forward + backward (issue #19, float8 lever).

One Transformers Qwen2DecoderLayer per shape (random init, causal SDPA, no packing so only the linear
layers differ), compiled as accel-tp compiles its layers (`layer.compile()`), timed with CUDA events
over `--iters` forward + backward passes after warm-up. Arms: bf16; torchao's float8 training with the
"tensorwise" and "rowwise" recipes (every nn.Linear of the layer swapped for Float8Linear). Accuracy:
each arm's layer output and input gradient against an fp32 copy of the same layer, relative Frobenius
error (the bf16 arm's error is the noise floor the others are compared with).

    python docs/bench/2026-12-06_float8_layers.py --json $OUT/float8.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

SHAPES = {
    # name: hidden, intermediate, heads, kv heads, rows x seq per micro-batch
    "qwen2.5-1.5b": (1536, 8960, 12, 2, (4, 4096)),
    "qwen2.5-7b": (3584, 18944, 28, 4, (2, 4096)),
}


def build(shape: str):
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RotaryEmbedding

    h, ffn, heads, kv, _ = SHAPES[shape]
    cfg = Qwen2Config(
        hidden_size=h,
        intermediate_size=ffn,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        num_hidden_layers=1,
        max_position_embeddings=32768,
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    layer = Qwen2DecoderLayer(cfg, layer_idx=0)
    return layer, Qwen2RotaryEmbedding(cfg), cfg


def run_layer(layer, rope, x, pos):
    cos, sin = rope(x, pos)
    out = layer(x, attention_mask=None, position_ids=pos, position_embeddings=(cos, sin))
    return out[0] if isinstance(out, tuple) else out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--json")
    a = p.parse_args()
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    dev = "cuda"
    rows = []
    for shape in a.shapes.split(","):
        layer32, rope, cfg = build(shape)
        layer32 = layer32.to(dev)
        rope = rope.to(dev)
        b, s = SHAPES[shape][4]
        torch.manual_seed(1)
        x32 = torch.randn(b, s, cfg.hidden_size, device=dev)
        pos = torch.arange(s, device=dev).expand(b, s)
        gout = torch.randn(b, s, cfg.hidden_size, device=dev)
        # fp32 reference output and input gradient
        xr = x32.clone().requires_grad_(True)
        ref = run_layer(layer32, rope, xr, pos)
        ref.backward(gout)
        ref_out, ref_gx = ref.detach(), xr.grad.detach()
        # linear FLOPs of one layer's forward: 2 * tokens * (q, k, v, o, gate, up, down weights)
        h, ffn, heads, kv = SHAPES[shape][:4]
        hd = h // heads
        weights = h * h + 2 * h * kv * hd + h * h + 3 * h * ffn
        linear_flops = 3 * 2 * b * s * weights  # forward + backward (2x)
        for arm in ("bf16", "float8-tensorwise", "float8-rowwise"):
            layer = copy.deepcopy(layer32).to(torch.bfloat16)
            if arm != "bf16":
                recipe = arm.split("-", 1)[1]
                convert_to_float8_training(layer, config=Float8LinearConfig.from_recipe_name(recipe))
            layer.compile()
            x = x32.to(torch.bfloat16).requires_grad_(True)
            g = gout.to(torch.bfloat16)
            t0 = time.time()
            for _ in range(a.warmup):
                out = run_layer(layer, rope, x, pos)
                out.backward(g)
                x.grad = None
                layer.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            warm_s = time.time() - t0
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(a.iters):
                out = run_layer(layer, rope, x, pos)
                out.backward(g)
                x.grad = None
                layer.zero_grad(set_to_none=True)
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end) / a.iters
            out = run_layer(layer, rope, x, pos)
            out.backward(g)
            row = {
                "shape": shape,
                "arm": arm,
                "tokens": b * s,
                "ms_fwd_bwd": round(ms, 3),
                "linear_tflops_per_s": round(linear_flops / ms / 1e9, 1),
                "out_rel_err_vs_fp32": rel(out.detach(), ref_out),
                "grad_in_rel_err_vs_fp32": rel(x.grad, ref_gx),
                "warmup_s": round(warm_s, 1),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
            del layer, x, out
            torch.cuda.empty_cache()
        base = {r["shape"]: r["ms_fwd_bwd"] for r in rows if r["arm"] == "bf16"}
        for r in rows:
            r["speedup_vs_bf16"] = round(base[r["shape"]] / r["ms_fwd_bwd"], 3)
    print(json.dumps([(r["shape"], r["arm"], r["ms_fwd_bwd"], r["speedup_vs_bf16"]) for r in rows]))
    if a.json:
        meta = {
            "gpu": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        }
        with open(a.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
