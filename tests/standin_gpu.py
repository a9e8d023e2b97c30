"""A stand-in GPU for CPU tests: tensors that report the meta device (a device that is not the CPU,
whose use needs no driver) but hold and compute real CPU data, and that refuse, as CUDA does, an
operation mixing them with CPU tensors.

    with stand_in_gpu():
        model.to(GPU)            # parameters and buffers move onto the stand-in
        loss = objective(model, {k: v.to(GPU) for k, v in batch.items()})

Inside the block, `device=GPU` makes stand-in tensors, `.to(GPU)` moves onto them and `.cpu()` back.
What CUDA accepts across devices is accepted here too: copies, CPU index tensors into a GPU tensor,
and a zero-dimensional CPU tensor as an elementwise operation's input (CUDA takes it as a scalar).
Attention runs PyTorch's math kernel (the meta device has no fused one), and an operation that
changes a tensor's shape in place is refused as not covered."""
from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

GPU = torch.device("meta")
aten = torch.ops.aten
COPIES = {aten._to_copy.default, aten.copy_.default}
INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


class DeviceMismatch(RuntimeError):
    """What CUDA raises for an operation whose tensors are on two devices."""


class OnGpu(torch.Tensor):
    """A CPU tensor, `inner`, that reports `GPU` as its device."""

    @staticmethod
    def __new__(cls, inner: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(cls, inner.shape, strides=inner.stride(), dtype=inner.dtype,
                                                   device=GPU, storage_offset=inner.storage_offset())

    def __init__(self, inner: torch.Tensor):
        self.inner = inner

    def __repr__(self) -> str:
        return f"OnGpu({self.inner!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        with stand_in_gpu():  # a stand-in tensor used after its block still computes
            return func(*args, **(kwargs or {}))


def unwrap(value):
    return value.inner if isinstance(value, OnGpu) else value


@contextlib.contextmanager
def stand_in_gpu():
    with DataOntoGpu(), ComputeOnCpu():
        yield


class DataOntoGpu(TorchFunctionMode):
    """torch builds a tensor from Python data (`torch.tensor(data, device=...)`, a list as an index) on
    its device without dispatching an operation, so on the meta device its values would be lost: here
    it is built on the CPU, then moved (an index stays on the CPU, which CUDA accepts)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in (torch.tensor, torch.as_tensor, torch.asarray) and is_gpu(kwargs.get("device")):
            return func(*args, **{**kwargs, "device": "cpu"}).to(GPU)
        if func is torch.Tensor.new_tensor and isinstance(args[0], OnGpu) and kwargs.get("device") is None:
            return torch.tensor(args[1], dtype=kwargs.get("dtype", args[0].dtype)).to(GPU)
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and isinstance(args[0], OnGpu):
            args = (args[0], lists_as_tensors(args[1]), *args[2:])
        return func(*args, **kwargs)


def is_gpu(device) -> bool:
    return device is not None and torch.device(device) == GPU


def lists_as_tensors(index):
    if isinstance(index, list):
        return torch.tensor(index)
    return tuple(map(lists_as_tensors, index)) if isinstance(index, tuple) else index


class ComputeOnCpu(TorchDispatchMode):
    """Every operation on the stand-in's tensors runs on their CPU data."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        on_gpu = {id(t.inner): t for t in tensors if isinstance(t, OnGpu)}
        named = kwargs.get("device")
        to_gpu = is_gpu(named)
        check_devices(func, args, kwargs, tensors, bool(on_gpu) or to_gpu)
        if named is not None:
            kwargs["device"] = torch.device("cpu")
        out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
        reshaped = [w for w in on_gpu.values() if (w.shape, w.stride()) != (w.inner.shape, w.inner.stride())]
        if reshaped:
            raise NotImplementedError(f"{func} changed a stand-in tensor's shape in place: not covered")
        if not (to_gpu or (on_gpu and named is None)):
            return out
        # an in-place operation returns its input: the stand-in tensor itself, not a second one
        return tree_map(lambda t: on_gpu[id(t)] if id(t) in on_gpu else OnGpu(t) if isinstance(t, torch.Tensor)
                        else t, out)


def check_devices(func, args, kwargs, tensors: list[torch.Tensor], on_gpu: bool) -> None:
    """CUDA's rules: no CPU tensor beside a GPU one, except a zero-dimensional input of an elementwise
    operation (a scalar); copies between devices; CPU indices into a GPU tensor."""
    data_less = [tuple(t.shape) for t in tensors if not isinstance(t, OnGpu) and t.device == GPU]
    if data_less:
        # built from data by a path DataOntoGpu does not cover: computing on would give garbage
        raise DeviceMismatch(f"{func}: a tensor on the GPU without values (shape {data_less}): the stand-in "
                             "does not cover how it was made")
    generator = kwargs.get("generator")
    if on_gpu and generator is not None and generator.device.type == "cpu":
        raise DeviceMismatch(f"{func}: a CPU generator for a GPU tensor")
    if not on_gpu or func in COPIES:
        return
    if func in INDEXING:
        indexed, indices, *rest = args
        if not isinstance(indexed, OnGpu):
            raise DeviceMismatch(f"{func}: indices on the GPU into a CPU tensor")
        tensors = [indexed, *(t for t in rest if isinstance(t, torch.Tensor))]
    written = {id(t) for t in written_tensors(func, args, kwargs)}
    scalars_allowed = torch.Tag.pointwise in func.tags or func in INDEXING
    strays = [tuple(t.shape) for t in tensors if not isinstance(t, OnGpu)
              and (t.dim() > 0 or not scalars_allowed or id(t) in written)]
    if strays:
        raise DeviceMismatch(f"{func}: expected all tensors to be on the same device, but found at least two "
                             f"devices, the GPU and cpu (CPU tensors of shape {strays})")


def written_tensors(func, args, kwargs) -> list[torch.Tensor]:
    """The tensors an operation writes: its in-place argument or its `out=`."""
    written = []
    for position, argument in enumerate(func._schema.arguments):
        if argument.alias_info is not None and argument.alias_info.is_write:
            value = args[position] if position < len(args) else kwargs.get(argument.name)
            written += [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]
    return written
