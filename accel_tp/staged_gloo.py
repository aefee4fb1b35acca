"""A torch.distributed backend for several ranks on one GPU: each collective stages its CUDA
tensors through host memory and runs it with gloo. For tests and benchmarks only (not a setting).

NCCL refuses two ranks on one device, and gloo takes CUDA tensors only for broadcast, all_reduce
and reduce, while AutoTP and ZeRO also all-gather, reduce-scatter and all-to-all. Here every op
copies its CUDA inputs to the host, runs gloo's op there, and copies the results back, so the GPU
kernels run for real and only the transport is slow (and synchronous: each op waits for the
device, then for its peers). Registered under NAME when this module is imported; selected by
setting PROCESS_GROUP_ENV=NAME in the environment of every rank (env.process_group_backend).

Reductions are gloo's on the host copies (fp32 / bf16 sums in the host's order), so results
match a gloo CPU run of the same ops, not NCCL's reduction order. A reduce-scatter is an all-reduce
of the whole input followed by taking this rank's chunk: gloo's own reduce-scatter exists for few
dtypes, and the result is the same.

Imports nothing of accel-tp.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import _create_work_from_future
from torch.futures import Future

__all__ = ["NAME", "StagedGloo"]

NAME = "staged_gloo"


def _done() -> Any:
    fut: Future = Future()
    fut.set_result(None)
    return _create_work_from_future(fut)


def _host(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu() if t.is_cuda else t


def _back(dst: torch.Tensor, src: torch.Tensor) -> None:
    if src is not dst:
        dst.copy_(src)


def _host_like(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.empty(t.shape, dtype=t.dtype) for t in ts]


def _copy_all(dsts: list[torch.Tensor], srcs: list[torch.Tensor]) -> None:
    for d, s in zip(dsts, srcs):
        d.copy_(s)


class StagedGloo(dist.ProcessGroup):
    """gloo on host copies of the tensors (see the module docstring)."""

    def __init__(self, store: Any, rank: int, size: int, timeout: timedelta) -> None:
        super().__init__(rank, size)
        self._size = size
        self._gloo = dist.ProcessGroupGloo(store, rank, size, timeout)
        # c10d looks a group's backend up by device (init_process_group(device_id=cuda:0), as
        # DeepSpeed calls it on GPUs; compiled functional collectives): gloo's, which takes CUDA
        # tensors for all_reduce and broadcast. Calls from Python come to the methods below.
        for device in ("cpu", "cuda"):
            self._register_backend(torch.device(device), dist.ProcessGroup.BackendType.GLOO, self._gloo)

    def getBackendName(self) -> str:  # noqa: N802 (torch's name)
        return NAME

    def size(self) -> int:
        return self._size

    @property
    def group_name(self) -> str:
        # c10d records a custom backend's group name only in its own table (the C++ name stays
        # unset for a Python ProcessGroup); DeviceMesh reads it from here.
        name = dist.distributed_c10d._world.pg_names[self]
        self._set_group_name(name)
        return name

    @property
    def pg_name(self) -> str:
        return self.group_name

    def _reduce_in_place(self, tensors: list[torch.Tensor], reduce_op: Any, root: int | None = None) -> Any:
        """all_reduce (root None) or reduce to `root` of host copies, written back."""
        host = [_host(t) for t in tensors]
        avg = reduce_op == dist.ReduceOp.AVG
        opts = dist.AllreduceOptions() if root is None else dist.ReduceOptions()
        opts.reduceOp = dist.ReduceOp.SUM if avg else reduce_op  # gloo has no AVG: a sum, divided
        if root is None:
            self._gloo.allreduce(host, opts).wait()
        else:
            opts.rootRank = root
            self._gloo.reduce(host, opts).wait()
        for t, h in zip(tensors, host):
            if avg:
                h.div_(self._size)
            _back(t, h)
        return _done()

    def allreduce(self, tensors: list[torch.Tensor], opts: Any = None) -> Any:
        return self._reduce_in_place(tensors, (opts or dist.AllreduceOptions()).reduceOp)

    def reduce(self, tensors: list[torch.Tensor], opts: Any = None) -> Any:
        opts = opts or dist.ReduceOptions()
        return self._reduce_in_place(tensors, opts.reduceOp, opts.rootRank)

    def allreduce_coalesced(self, tensors: list[torch.Tensor], opts: Any = None) -> Any:
        for t in tensors:
            self.allreduce([t], opts)
        return _done()

    def broadcast(self, tensors: list[torch.Tensor], opts: Any = None) -> Any:
        host = [_host(t) for t in tensors]
        self._gloo.broadcast(host, opts or dist.BroadcastOptions()).wait()
        for t, h in zip(tensors, host):
            _back(t, h)
        return _done()

    def barrier(self, opts: Any = None) -> Any:
        self._gloo.allreduce([torch.zeros(1)]).wait()
        return _done()

    def allgather(
        self, outputs: list[list[torch.Tensor]], inputs: list[torch.Tensor], opts: Any = None
    ) -> Any:
        host_out = [_host_like(outs) for outs in outputs]
        self._gloo.allgather(host_out, [_host(t) for t in inputs]).wait()
        for outs, hs in zip(outputs, host_out):
            _copy_all(outs, hs)
        return _done()

    def allgather_coalesced(
        self, outputs: list[list[torch.Tensor]], inputs: list[torch.Tensor], opts: Any = None
    ) -> Any:
        for outs, i in zip(outputs, inputs):
            self.allgather([outs], [i], opts)
        return _done()

    def all_gather_single(self, output: torch.Tensor, input: torch.Tensor, opts: Any = None) -> Any:
        return self.allgather([list(output.chunk(self._size))], [input], opts)

    def all_gather_single_coalesced(
        self, outputs: list[torch.Tensor], inputs: list[torch.Tensor], opts: Any = None
    ) -> Any:
        for o, i in zip(outputs, inputs):
            self.all_gather_single(o, i, opts)
        return _done()

    def reduce_scatter_single(self, output: torch.Tensor, input: torch.Tensor, opts: Any = None) -> Any:
        whole = _host(input).clone()
        self._reduce_in_place([whole], (opts or dist.ReduceScatterOptions()).reduceOp)
        output.copy_(whole.chunk(self._size)[self.rank()])
        return _done()

    def reduce_scatter(
        self, outputs: list[torch.Tensor], inputs: list[list[torch.Tensor]], opts: Any = None
    ) -> Any:
        for o, parts in zip(outputs, inputs):
            flat = torch.empty(o.numel(), dtype=o.dtype, device=o.device)
            self.reduce_scatter_single(flat, torch.cat([p.reshape(-1) for p in parts]), opts)
            o.copy_(flat.view(o.shape))
        return _done()

    def reduce_scatter_single_coalesced(
        self, outputs: list[torch.Tensor], inputs: list[torch.Tensor], opts: Any = None
    ) -> Any:
        for o, i in zip(outputs, inputs):
            self.reduce_scatter_single(o, i, opts)
        return _done()

    def all_to_all_single(
        self,
        output: torch.Tensor,
        input: torch.Tensor,
        output_split_sizes: list[int],
        input_split_sizes: list[int],
        opts: Any = None,
    ) -> Any:
        host_out = torch.empty(output.shape, dtype=output.dtype)
        self._gloo.alltoall_base(
            host_out, _host(input), output_split_sizes, input_split_sizes, opts or dist.AllToAllOptions()
        ).wait()
        output.copy_(host_out)
        return _done()

    def alltoall(self, outputs: list[torch.Tensor], inputs: list[torch.Tensor], opts: Any = None) -> Any:
        # One send and one receive per peer (gloo's all-to-all takes one flat tensor).
        host_out = _host_like(outputs)
        host_in = [_host(i) for i in inputs]
        me = self.rank()
        works = []
        for peer in range(self._size):
            if peer == me:
                host_out[peer].copy_(host_in[peer])
                continue
            works.append(self._gloo.send([host_in[peer]], peer, 0))
            works.append(self._gloo.recv([host_out[peer]], peer, 0))
        for w in works:
            w.wait()
        _copy_all(outputs, host_out)
        return _done()

    def send(self, tensors: list[torch.Tensor], dst: int, tag: int = 0) -> Any:
        self._gloo.send([_host(t) for t in tensors], dst, tag).wait()
        return _done()

    def recv_anysource(self, tensors: list[torch.Tensor], tag: int = 0) -> Any:
        raise NotImplementedError(f"{NAME}: receiving from any source is not staged")

    def recv(self, tensors: list[torch.Tensor], src: int, tag: int = 0) -> Any:
        host = _host_like(tensors)
        self._gloo.recv(host, src, tag).wait()
        _copy_all(tensors, host)
        return _done()

    def gather(self, outputs: list[list[torch.Tensor]], inputs: list[torch.Tensor], opts: Any = None) -> Any:
        host_out = [_host_like(outs) for outs in outputs]
        self._gloo.gather(host_out, [_host(t) for t in inputs], opts or dist.GatherOptions()).wait()
        for outs, hs in zip(outputs, host_out):
            _copy_all(outs, hs)
        return _done()

    def scatter(self, outputs: list[torch.Tensor], inputs: list[list[torch.Tensor]], opts: Any = None) -> Any:
        host_out = _host_like(outputs)
        host_in = [[_host(t) for t in ins] for ins in inputs]
        self._gloo.scatter(host_out, host_in, opts or dist.ScatterOptions()).wait()
        _copy_all(outputs, host_out)
        return _done()


def _create(store: Any, rank: int, size: int, timeout: timedelta) -> StagedGloo:
    return StagedGloo(store, rank, size, timeout)


if NAME not in dist.Backend.backend_list:
    dist.Backend.register_backend(NAME, _create, devices=["cpu", "cuda"])
