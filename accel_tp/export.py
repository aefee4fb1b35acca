"""Consolidated Hugging Face export of a TP-sharded, ZeRO-partitioned model.

Two ways in, one gathering path:

* `export_hf` at the end of training: all ranks take part; `accelerator.get_state_dict` calls
  DeepSpeed's `engine._consolidated_16bit_state_dict()`, which all-gathers the AutoTP shards into
  full tensors; rank 0 then writes safetensors, config and tokenizer with `save_pretrained`.
* `export_checkpoint` (scripts/export_hf.py) from a saved checkpoint: it starts tp_size processes
  (gloo, CPU), each builds the model from the run's config, DeepSpeed shards it with the
  checkpoint's AutoTP size (dp = 1, no ZeRO, no optimizer), loads its `mp_rank_XX` module weights
  (`load_module_only`), and then `export_hf` gathers and writes as above. DeepSpeed does the
  gathering; nothing here merges shards by hand.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint.format import (
    DS_TAG,
    RAY_SNAPSHOT_FILE,
    RUN_CONFIG_FILE,
    STEP_NAME_PATTERN,
    TMP_PREFIX,
    TRAIN_STATE_FILE,
    model_states_file,
    peek_train_state,
    ray_registered,
    steps_under,
    tmp_name,
)
from .checkpoint.safe_load import verify_checkpoint, weights_only_loads
from .compat.transformers import without_hf_zero3_init
from .config import Config, ConfigError, LoraSection, load_config
from .env import apply_worker_env, free_port, quiet_libraries
from .errors import ExportError
from .experts import expert_layers, hf_state_dict, zero3_state_dict
from .lora import (
    apply_lora,
    base_digest,
    describe,
    hidden_from_autotp,
    merged_state_dict,
    resolve_adapter,
    save_adapter,
)
from .model import (
    build_meta_model,
    build_model,
    load_tokenizer,
    model_config,
    model_fingerprint,
    param_groups,
)
from .parallel import Topology, build_deepspeed_config, make_deepspeed_plugin
from .parallelize import prepare_vocabulary_split
from .run_folder import ADAPTER_DIR, CHECKPOINTS_DIR
from .storage import download, exists, is_remote, join, replace_folder

__all__ = [
    "export_hf",
    "AdapterExport",
    "export_checkpoint",
    "inspect_checkpoint",
    "CheckpointInfo",
    "DTYPES",
    "EXPORT_CHECK_FILE",
]

# Beside an end-of-training export: a training batch and the trained model's logits and loss on it.
EXPORT_CHECK_FILE = "export_check.pt"
# Written into every export: --overwrite replaces only a folder that holds it.
EXPORT_MARKER = ".accel-tp-export"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export_hf(
    accelerator: Any,
    engine: Any,
    tokenizer: Any,
    out_dir: str | Path,
    probe: dict | None = None,
    dtype: torch.dtype | None = None,
    adapters: AdapterExport | None = None,
) -> Path:
    """Write the trained model as a plain HF model to `out_dir`; returns the folder.

    With `probe` (a batch), rank 0 also saves that batch and the trained model's logits and loss
    on it as EXPORT_CHECK_FILE beside the export, so the export can be verified against them.
    `tokenizer` None writes no tokenizer; `dtype` casts the weights (default: as the engine holds them).
    `adapters` (a LoRA run): the merged model goes to `out_dir` and/or the PEFT adapter folder to
    `adapters.folder`, as `adapters.what` says; the check file goes beside whichever is written.
    """
    out = Path(out_dir)
    module = accelerator.unwrap_model(engine)
    if expert_layers(module) and engine.zero_optimization_partition_weights():
        state_dict = zero3_state_dict(module)  # DeepSpeed refuses this case (experts.zero3_state_dict)
    else:
        state_dict = accelerator.get_state_dict(engine)  # collective: every rank must call it
    if expert_layers(module):
        # AutoEP's layers hold one EP rank's experts under its own names: gathered, and written
        # in the layout of the model class the run started from (collective too).
        with without_hf_zero3_init():
            meta = build_meta_model(module.config, getattr(module.config, "trust_remote_code", False))
        state_dict = hf_state_dict(state_dict, module, meta)
    check = None
    if probe is not None:
        batch = {k: v.to(accelerator.device) for k, v in probe.items()}
        engine.eval()
        with torch.no_grad():
            res = engine(**batch, use_cache=False)
        engine.train()
        check = {
            "batch": {k: v.cpu() for k, v in batch.items()},
            "logits": _whole_vocab(res.logits.float().cpu(), accelerator.unwrap_model(engine)),
            "loss": float(res.loss),
        }
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(engine)
        if dtype is not None:
            state_dict = {k: v.to(dtype) for k, v in state_dict.items()}
            model.to(dtype)  # save_pretrained records the module's dtype in config.json
        folders = []
        if adapters is not None and adapters.what in ("adapter", "both"):
            save_adapter(adapters.folder, state_dict, model, adapters.section, adapters.base_model)
            folders.append(adapters.folder)
        if adapters is None or adapters.what in ("merged", "both"):
            if adapters is not None:
                state_dict = merged_state_dict(state_dict, model)
            out.mkdir(parents=True, exist_ok=True)
            model.config.use_cache = True
            model.save_pretrained(out, state_dict=state_dict, safe_serialization=True)
            folders.append(out)
        for folder in folders:
            (folder / EXPORT_MARKER).write_text("written by accel-tp; --overwrite may replace this folder\n")
            if tokenizer is not None:
                tokenizer.save_pretrained(folder)
            if check is not None:
                torch.save(check, folder / EXPORT_CHECK_FILE)
    accelerator.wait_for_everyone()
    return out if adapters is None or adapters.what != "adapter" else adapters.folder


@dataclass
class AdapterExport:
    """What a LoRA run exports: "adapter" (a PEFT folder), "merged" (a plain model) or "both"."""

    section: LoraSection
    what: str
    folder: Path  # the PEFT adapter folder
    base_model: str | None  # recorded in adapter_config.json (base_model_name_or_path)


def _whole_vocab(logits: torch.Tensor, model: Any) -> torch.Tensor:
    """Logits over the whole vocabulary. A vocab-parallel lm_head (tied Gemma-3, Starcoder2 under
    AutoTP) leaves each TP rank its own slice of the vocabulary, in rank order: gather them (every
    rank calls this; the shapes, hence the branch, are the same on all)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    vocab = getattr(config, "vocab_size", None)
    if vocab is None or logits.shape[-1] == vocab or not torch.distributed.is_initialized():
        return logits
    from deepspeed.utils import groups

    parts: list[Any] = [None] * groups.get_tensor_model_parallel_world_size()
    torch.distributed.all_gather_object(parts, logits, group=groups.get_tensor_model_parallel_group())
    whole = torch.cat(parts, dim=-1)
    if whole.shape[-1] != vocab:
        raise RuntimeError(
            f"export check: gathered logits have {whole.shape[-1]} columns, the vocabulary {vocab}"
        )
    return whole


@dataclass
class CheckpointInfo:
    """What an export needs to know about a checkpoint, read without loading its weights."""

    path: Path
    tp_size: int
    dtype: torch.dtype  # the module weights' dtype (the training precision)
    dp_size: int  # ZeRO-3 only: the module files hold placeholders, the weights are in dp x tp partitions
    train_state: dict[str, Any]
    run_config: Path | None  # the run's YAML recorded in the checkpoint, if any


def _not_a_checkpoint(path: Path) -> ConfigError:
    # A run folder (local runs keep theirs under checkpoints/) or a Ray run folder: name its steps.
    steps = ray_registered(path) or [
        p for _, p in sorted(steps_under(path) or steps_under(path / CHECKPOINTS_DIR))
    ]
    if steps:
        names = ", ".join(p.name for p in steps[-3:])
        hint = f"it holds checkpoints ({names}); pass one of them, e.g. --checkpoint {steps[-1]}"
    else:
        hint = (
            f"pass a {STEP_NAME_PATTERN} folder saved by accel-tp (it holds {TRAIN_STATE_FILE} and "
            f"{DS_TAG}/{model_states_file(0)})"
        )
    return ConfigError(f"--checkpoint: {str(path)!r} is not an accel-tp checkpoint; {hint}.")


def inspect_checkpoint(path: str | os.PathLike) -> CheckpointInfo:
    """Check that `path` is one complete accel-tp checkpoint; its TP size, dtype and train state."""
    if "://" in str(path):
        raise ConfigError(
            f"--checkpoint: {str(path)!r} is remote; export reads a local folder. Copy the checkpoint "
            "down first (e.g. ray.train.Checkpoint(path).to_directory(), aws s3 sync, gsutil rsync)."
        )
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ConfigError(f"--checkpoint: no folder {str(p)!r}.")
    if p.name.startswith(TMP_PREFIX):
        raise ConfigError(
            f"--checkpoint: {str(p)!r} is an unfinished save (a {TMP_PREFIX} folder becomes a checkpoint "
            f"only once complete); pass a {STEP_NAME_PATTERN} folder."
        )
    state = peek_train_state(p)
    zero3 = _is_zero3(p)
    rank0 = p / DS_TAG / model_states_file(0, dp_rank=0 if zero3 else None)
    if state is None or not rank0.is_file():
        raise _not_a_checkpoint(p)
    # Metadata only: mmap reads no tensor data, weights_only unpickles nothing but tensors and
    # plain containers.
    try:
        meta = torch.load(rank0, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated, or not a DeepSpeed model file
        raise ConfigError(
            f"--checkpoint: cannot read {str(rank0)!r} ({e}); pass a complete checkpoint."
        ) from e
    ds = meta.get("ds_config") or {}
    tp = int((ds.get("tensor_parallel") or {}).get("autotp_size") or meta.get("mp_world_size") or 1)
    dp = int(meta.get("dp_world_size") or 1) if zero3 else 1
    del meta
    names = (
        [model_states_file(t, dp_rank=d) for d in range(dp) for t in range(tp)]
        if zero3
        else [model_states_file(t) for t in range(tp)]
    )
    missing = [f"{DS_TAG}/{n}" for n in names if not (p / DS_TAG / n).is_file()]
    if missing:
        raise ConfigError(
            f"--checkpoint: {str(p)!r} is incomplete: it was saved with tp_size {tp} but lacks {missing}. "
            "Pass a complete checkpoint (for Ray runs, the step folder under <storage_path>/<run name>)."
        )
    if (ds.get("bf16") or {}).get("enabled"):
        dtype = torch.bfloat16
    elif (ds.get("fp16") or {}).get("enabled"):
        dtype = torch.float16
    else:
        dtype = torch.float32
    registered = ray_registered(p.parent)
    if registered is not None and p.resolve() not in {c.resolve() for c in registered}:
        latest = f"; the latest it registered is {registered[-1]}" if registered else ""
        raise ConfigError(
            f"--checkpoint: Ray never registered {str(p)!r} as a checkpoint of its run (a save that a "
            f"crash cut short, or one Ray is still collecting){latest}. Pass a registered one."
        )
    recorded = p / RUN_CONFIG_FILE
    return CheckpointInfo(p, tp, dtype, dp, state, recorded if recorded.is_file() else None)


def _is_zero3(checkpoint: Path) -> bool:
    """ZeRO-3 names its module files per DP and TP rank (model_states_file(t, dp_rank))."""
    return not (checkpoint / DS_TAG / model_states_file(0)).is_file()


def _check_out_dir(out: Path, checkpoint: Path, overwrite: bool) -> None:
    """The export replaces `out` whole, so `out` must be a new or empty folder, or (with
    --overwrite) an earlier export: never the working directory, the home folder, a folder around
    the checkpoint, or a folder of the user's own files."""
    out_r, ck_r = out.resolve(), checkpoint.resolve()
    if out_r in {Path.cwd().resolve(), Path.home().resolve(), Path(out_r.anchor)}:
        raise ExportError(
            f"--out: {str(out)!r} is {out_r} (the working directory, home or the filesystem root); the "
            "export replaces its folder whole. Pick a new folder, e.g. --out exports/my-model."
        )
    if ck_r.is_relative_to(out_r) or out_r.is_relative_to(ck_r):
        raise ExportError(
            f"--out: {str(out)!r} overlaps the checkpoint {str(checkpoint)!r}; pick a folder outside it."
        )
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out: {str(out)!r} is a file; pick a folder.")
    if out.is_dir() and any(out.iterdir()):
        if not (out / EXPORT_MARKER).is_file():
            raise ExportError(
                f"--out: {str(out)!r} holds files accel-tp did not write (no {EXPORT_MARKER}); the export "
                "never deletes them. Pick a new folder."
            )
        if not overwrite:
            raise ExportError(
                f"--out: {str(out)!r} holds an earlier export; pick a new folder, or pass --overwrite to "
                "replace it."
            )


def _export_worker(
    rank: int,
    world: int,
    port: int,
    cfg: Config,
    vocab_size: int,
    ckpt: str,
    out: str,
    load_dtype: str,
    out_dtype: str,
    tp_size: int,
    zero3: bool,
    trust_pickles: bool,
    base: str | None = None,
) -> None:
    """One rank of the export (spawned; tp_size ranks, ZeRO-3: dp x tp). CPU and gloo, also on a GPU
    machine."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        DS_ACCELERATOR="cpu",  # read when deepspeed is imported, i.e. below
        CUDA_VISIBLE_DEVICES="",
    )
    apply_worker_env()
    quiet_libraries()
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    # Not ZeRO-3: dp = 1, no ZeRO, no optimizer: only the module weights are loaded; precision
    # "fp32" adds no mixed-precision block, so DeepSpeed keeps the module in the dtype it is built
    # in (below). ZeRO-3 keeps the weights only in its dp x tp partitions, which DeepSpeed reads
    # back through a same-layout engine with the run's optimizer (the module files hold
    # placeholders, and its module-only path is not AutoTP-aware: zero_to_fp32 globs every
    # partition). The DeepSpeed config sets the gather flag that lets accelerator.get_state_dict
    # consolidate the AutoTP shards (and the ZeRO-3 partitions).
    topo = Topology(world_size=world, tp_size=tp_size, rank=rank)
    precision = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[load_dtype] if zero3 else "fp32"
    ds_config = build_deepspeed_config(cfg, topo, precision, zero_stage=3 if zero3 else 0)
    accelerator = Accelerator(
        deepspeed_plugin=make_deepspeed_plugin(ds_config),
        mixed_precision={"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision],
        kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")],
    )
    mconf = model_config(cfg.model, vocab_size)
    # No forward pass runs here, and flex / flash attention need a GPU (config.json does not record it).
    attn = cfg.model.attn_implementation
    mconf._attn_implementation = attn if attn in ("sdpa", "eager") else None  # None: transformers' choice
    lora = cfg.lora.enabled
    if lora:
        # The checkpoint holds only the adapters: the base is read as the run read it, then the
        # adapters are injected (and overwritten by the checkpoint's) and split with their layers.
        with without_hf_zero3_init():
            model = build_model(cfg.model, mconf, cfg.run.seed)
        if base is not None and base_digest(model) != base:
            raise ExportError(
                f"--checkpoint: its adapters were trained on another base model than {cfg.model.name_or_path!r} "
                "(the frozen weights' digest differs); point model.name_or_path at the base it was trained on."
            )
        apply_lora(model, cfg.lora, cfg.run.seed)
    else:
        # Built in the checkpoint's dtype, so its weights load as they are (and bf16 takes half the
        # memory). Every weight is overwritten by the checkpoint (strict load): skip the random init.
        with without_hf_zero3_init(), no_init_weights():
            model = AutoModelForCausalLM.from_config(
                mconf,
                dtype=torch.float32 if zero3 else DTYPES[load_dtype],
                trust_remote_code=cfg.model.trust_remote_code,
            )
    prepare_vocabulary_split(model, cfg)  # the head split as the run split it
    with hidden_from_autotp(model) if lora else contextlib.nullcontext():
        if zero3:
            optimizer = torch.optim.AdamW(
                param_groups(model, cfg.train.weight_decay), lr=cfg.train.learning_rate
            )
            engine, _ = accelerator.prepare(model, optimizer)
        else:
            engine = accelerator.prepare(model)
    strict = {"load_module_strict": False} if lora else {}
    # export_checkpoint checked every file; forced here too, so a file replaced since can only fail.
    with contextlib.nullcontext() if trust_pickles else weights_only_loads():
        if zero3:
            loaded, _ = engine.load_checkpoint(ckpt, tag=DS_TAG, load_lr_scheduler_states=False, **strict)
        else:
            loaded, _ = engine.load_checkpoint(
                ckpt,
                tag=DS_TAG,
                load_module_only=True,
                load_optimizer_states=False,
                load_lr_scheduler_states=False,
                **strict,
            )
    if loaded is None:
        raise RuntimeError(f"DeepSpeed could not load {ckpt}/{DS_TAG}")
    engine.eval()
    adapters = None
    if lora:
        # The merged model in `out`, the PEFT adapter folder beside its files in out/adapter.
        base_model = cfg.model.name_or_path or cfg.model.architecture
        adapters = AdapterExport(cfg.lora, "both", Path(out) / ADAPTER_DIR, base_model)
    export_hf(accelerator, engine, None, out, dtype=DTYPES[out_dtype], adapters=adapters)
    accelerator.end_training()


def export_checkpoint(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
    overwrite: bool = False,
    dtype: str = "auto",
    trust_pickles: bool = False,
) -> Path:
    """Write a consolidated Hugging Face model (safetensors, config.json, tokenizer) from a checkpoint.

    The model and tokenizer come from `config` (the run's YAML; `overrides` are its `--set` values)
    or, without it, from the run config the checkpoint records. `dtype` "auto" keeps the training
    precision. The export is written under a temporary name and renamed when complete.
    `trust_pickles` (--trust-pickles) skips the weights-only check of the checkpoint's files; it is
    never taken from a config, the checkpoint's recorded one included.
    """
    if is_remote(checkpoint) or is_remote(out_dir):
        return _export_remote(
            str(checkpoint), str(out_dir), config, overrides, overwrite, dtype, trust_pickles
        )
    info = inspect_checkpoint(checkpoint)
    out = Path(out_dir).expanduser()
    _check_out_dir(out, info.path, overwrite)
    if dtype != "auto" and dtype not in DTYPES:
        raise ConfigError(f"--dtype: {dtype!r} is not one of {['auto', *DTYPES]}.")
    if config is not None:
        cfg = load_config(config, overrides)
    elif info.run_config is not None:
        cfg = load_config(info.run_config, overrides)
        user_set = any(o.split("=", 1)[0].strip() == "model.trust_remote_code" for o in overrides or [])
        if cfg.model.trust_remote_code and not user_set:
            # The recorded config is part of the checkpoint being loaded: it must not decide to run
            # the model folder's Python code.
            raise ExportError(
                f"--checkpoint: its recorded config ({RUN_CONFIG_FILE}) sets model.trust_remote_code: true, "
                f"which would run Python code from {cfg.model.name_or_path!r}. If you trust that model "
                "folder, say so yourself: --set model.trust_remote_code=true (or --config your YAML)."
            )
    else:
        raise ConfigError(
            f"--config: {str(info.path)!r} does not record its run config ({RUN_CONFIG_FILE}); pass the "
            "run's YAML with --config, and the --set overrides it was trained with."
        )
    tokenizer = load_tokenizer(cfg.model, cfg.data.resolved_cache_dir())
    mconf = model_config(cfg.model, len(tokenizer))
    cfg = dataclasses.replace(cfg, lora=resolve_adapter(cfg.lora))
    saved, built = info.train_state.get("model"), model_fingerprint(mconf) + describe(cfg.lora)
    if saved and saved != built:
        raise ConfigError(
            f"--checkpoint: {str(info.path)!r} is a checkpoint of another model ({saved}) than the config "
            f"builds ({built}); pass the run's own YAML (--config) and its --set overrides (model.*)."
        )
    load_dtype = str(info.dtype).removeprefix("torch.")
    if not trust_pickles:
        verify_checkpoint(info.path)  # before any worker starts: a one-line error naming the file

    tmp = out.parent / tmp_name(out.name)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        tokenizer.save_pretrained(tmp)
        import torch.multiprocessing as mp

        mp.start_processes(
            _export_worker,
            args=(
                info.tp_size * info.dp_size,
                free_port(),
                cfg,
                len(tokenizer),
                str(info.path),
                str(tmp),
                load_dtype,
                load_dtype if dtype == "auto" else dtype,
                info.tp_size,
                _is_zero3(info.path),
                trust_pickles,
                info.train_state.get("base") or None,
            ),
            nprocs=info.tp_size * info.dp_size,
            join=True,
            start_method="spawn",
        )
        # Replaced only now, so a failed export never leaves a half-written model at `out`; the
        # folder replaced is an earlier export (_check_out_dir) or empty.
        old = out.parent / tmp_name(out.name + ".replaced")
        if out.is_dir():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _export_remote(
    checkpoint: str,
    out_dir: str,
    config: str | os.PathLike | None,
    overrides: list[str] | None,
    overwrite: bool,
    dtype: str,
    trust_pickles: bool,
) -> Path | str:
    """export_checkpoint for a checkpoint and/or an output on object storage: the checkpoint is
    brought down into a temporary folder (after checking Ray registered it), the export is written
    locally and then copied up. Returns the output's path or URI."""
    import tempfile

    a, b = out_dir.rstrip("/") + "/", checkpoint.rstrip("/") + "/"
    if is_remote(out_dir) and (a.startswith(b) or b.startswith(a)):
        # --overwrite would replace the very folder the checkpoint is read from.
        raise ConfigError(
            f"--out: {out_dir!r} overlaps --checkpoint {checkpoint!r}; write the export elsewhere "
            "(e.g. s3://bucket/exports/<name>)."
        )
    with tempfile.TemporaryDirectory(prefix="accel-tp-export-") as tmp:
        local_ckpt: str | os.PathLike = checkpoint
        if is_remote(checkpoint):
            run = checkpoint.rstrip("/").rsplit("/", 1)[0]
            if exists(join(checkpoint, RAY_SNAPSHOT_FILE)):
                steps = ray_registered(checkpoint) or []
                hint = f"; pass one of its checkpoints, e.g. --checkpoint {join(checkpoint, steps[-1].name)}"
                raise ConfigError(f"--checkpoint: {checkpoint!r} is a Ray run folder{hint if steps else ''}.")
            registered = ray_registered(run)
            name = checkpoint.rstrip("/").rsplit("/", 1)[1]
            if registered is not None and name not in {c.name for c in registered}:
                latest = (
                    f"; the latest it registered is {join(run, registered[-1].name)}" if registered else ""
                )
                raise ConfigError(
                    f"--checkpoint: Ray never registered {checkpoint!r} as a checkpoint of its run (a save "
                    f"that a crash cut short, or one Ray is still collecting){latest}. Pass a registered one."
                )
            if not exists(checkpoint):
                raise ConfigError(f"--checkpoint: no checkpoint at {checkpoint!r}.")
            local_ckpt = download(checkpoint, Path(tmp) / "checkpoint" / name)
        if not is_remote(out_dir):
            return export_checkpoint(local_ckpt, out_dir, config, overrides, overwrite, dtype, trust_pickles)
        if exists(join(out_dir, RAY_SNAPSHOT_FILE)):
            raise ConfigError(f"--out: {out_dir!r} is a Ray run folder; write the export elsewhere.")
        if exists(out_dir) and not overwrite:
            raise ConfigError(f"--out: {out_dir!r} exists; pass --overwrite to replace it, or another --out.")
        local_out = export_checkpoint(
            local_ckpt, Path(tmp) / "out", config, overrides, False, dtype, trust_pickles
        )
        replace_folder(local_out, out_dir)
        return out_dir
