"""Every use of another library's private API, in one place, with the version it was checked on.

When one of these libraries is upgraded, this package is the list to re-check; each function says
what it patches or reads, why no public API does it, and how to tell it broke. A leaf: imports
nothing of accel-tp.

| module          | private API used                                                       | checked on        |
| --------------- | ---------------------------------------------------------------------- | ----------------- |
| deepspeed.py    | engine.clip_fp32_gradients (replaced), engine._global_grad_norm        | DeepSpeed 0.19.8  |
| deepspeed.py    | engine._config.load_universal_checkpoint (switched for one load)       | DeepSpeed 0.19.8  |
| deepspeed.py    | module.UNIVERSAL_CHECKPOINT_INFO (pruned: universal_info_without_frozen) | DeepSpeed 0.19.8  |
| accelerate.py   | Accelerator._models (the prepared DeepSpeed engines)                   | Accelerate 1.16   |
| transformers.py | integrations.deepspeed._hf_deepspeed_config_weak_ref (cleared, put back) | Transformers 5.25 |
| ray.py          | v2 data_parallel_trainer.create_scaling_policy (swapped for one fit)     | Ray 2.60          |
| ray.py          | ElasticScalingPolicy._count_possible_workers (overridden)              | Ray 2.60          |
| ray.py          | the logger of ray/train/v2/_internal/execution/context.py (quieted)    | Ray 2.60          |
| torch.py        | torch._dynamo.utils.counters (read)                                     | torch 2.13        |
| torch.py        | cpp_extension's FileBaton <build>/lock (clear_stale_build_locks)        | torch 2.13        |
| liger.py        | liger_kernel.transformers._apply_liger_kernel_to_instance              | Liger 0.6         |
"""
