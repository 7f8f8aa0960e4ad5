"""Devices: which one, in which precision, and how much memory a computation needs on it.

* :func:`pick_device`: CUDA when present, else the CPU.
* :class:`Precision` and :func:`choose_precision`: bf16 only where the chip has it natively
  (compute capability 8.0 and above: A100, L4, H100), fp16 with a gradient scaler below that
  (a T4 reports ``is_bf16_supported()`` True but emulates it, slowly), fp32 on a CPU.
  :func:`cpu_has_native_bf16` says whether this CPU would run an opted-in bf16 faster.
* :class:`Accelerator` and :data:`ACCELERATORS`: the GPUs people run the paper preset on, with
  their memory and peak FLOP/s, so a plan can be made for a GPU that is not here.
* :class:`PeakMemory`: live bytes of tensor storages, and their peak, while a computation runs.
  Under torch's ``FakeTensorMode`` no memory is allocated at all, so the paper model's training
  step can be measured on a laptop: the same principle as torch's own
  ``torch.distributed._tools.mem_tracker.MemTracker`` (which the tests compare it with), without
  its per-module bookkeeping, which makes it about ten times slower on the 554M-parameter UNet.

This module imports nothing else from diffad.
"""

from __future__ import annotations

import enum
import math
import numbers
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only
from torch.utils.weak import WeakIdKeyDictionary

__all__ = [
    "pick_device", "Precision", "choose_precision", "cpu_has_native_bf16", "Accelerator", "ACCELERATORS",
    "accelerator_of", "PeakMemory", "GIB",
]

GIB = 2**30
# The CUDA caching allocator hands out blocks in multiples of 512 bytes.
CUDA_BLOCK_BYTES = 512


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """The given device, else CUDA when present, else the CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Precision(str, enum.Enum):
    """The dtype the UNet's forward and backward run in (weights and optimizer stay fp32)."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {Precision.FP16: torch.float16, Precision.BF16: torch.bfloat16}.get(self)

    @property
    def needs_grad_scaler(self) -> bool:
        """fp16 gradients underflow without loss scaling; bf16 has fp32's range."""
        return self is Precision.FP16


PRECISION_CHOICES = ("auto",) + tuple(p.value for p in Precision)


def choose_precision(requested: str, device_type: str, compute_capability: tuple[int, int] | None) -> Precision:
    """``requested`` ("auto", "fp32", "fp16", "bf16") resolved for a device.

    "auto": fp32 on a CPU; on a GPU bf16 from compute capability 8.0 (native), fp16 below.
    An explicit choice is kept as asked: fp16/bf16 on a CPU run through CPU autocast. bf16 is the
    faster one on a CPU with AMX or AVX512-BF16 (:func:`cpu_has_native_bf16`: about twice as fast);
    a CPU without them has no native bf16 kernels. "auto" keeps fp32 on every CPU: the arithmetic
    of the shipped models.
    """
    if requested not in PRECISION_CHOICES:
        raise ValueError(f"precision must be one of {PRECISION_CHOICES}, got {requested!r}")
    if requested != "auto":
        return Precision(requested)
    if device_type != "cuda":
        return Precision.FP32
    if compute_capability is not None and tuple(compute_capability) >= (8, 0):
        return Precision.BF16
    return Precision.FP16


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX) that oneDNN's bf16 kernels use.

    There ``--set precision=bf16`` trains the cpu preset about twice as fast as fp32 (600 steps on 2
    cores: 4.4 minutes against 8.0); on a CPU without them bf16 is emulated and slower than fp32.
    Read through torch's own CPU probes (``torch.cpu._is_*_supported``, x86 only: False elsewhere,
    and on a torch without them).
    """
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


@dataclass(frozen=True)
class Accelerator:
    """A GPU as a plan sees it: memory, compute capability and dense peak FLOP/s per precision."""

    name: str
    memory_bytes: int
    compute_capability: tuple[int, int]
    peak_flops: dict  # Precision value -> dense FLOP/s (tensor cores where the precision has them)

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / GIB

    def peak_flops_for(self, precision: Precision) -> float | None:
        return self.peak_flops.get(precision.value)


def _gib(value: float) -> int:
    return int(round(value * GIB))


# Memory as nvidia-smi reports it; FLOP/s from the vendors' data sheets (dense, no sparsity;
# fp32 on Ampere and later is TF32 on tensor cores, which PyTorch uses for convolutions by default).
ACCELERATORS: dict[str, Accelerator] = {
    "T4": Accelerator("T4", _gib(15.0), (7, 5), {"fp16": 65e12, "fp32": 8.1e12}),
    "L4": Accelerator("L4", _gib(22.5), (8, 9), {"fp16": 121e12, "bf16": 121e12, "fp32": 60e12}),
    "A100-40GB": Accelerator("A100-40GB", _gib(40.0), (8, 0), {"fp16": 312e12, "bf16": 312e12, "fp32": 156e12}),
    "A100-80GB": Accelerator("A100-80GB", _gib(80.0), (8, 0), {"fp16": 312e12, "bf16": 312e12, "fp32": 156e12}),
    "H100": Accelerator("H100", _gib(80.0), (9, 0), {"fp16": 989e12, "bf16": 989e12, "fp32": 495e12}),
    "H200": Accelerator("H200", _gib(141.0), (9, 0), {"fp16": 989e12, "bf16": 989e12, "fp32": 495e12}),
}


def accelerator_of(device: torch.device | str | None = None, memory_gib: float | None = None,
                   compute_capability: tuple[int, int] | None = None) -> Accelerator | None:
    """The accelerator to plan for: described by hand (``memory_gib``, ``compute_capability``),
    else the CUDA device present, else None (a CPU).

    A hand description matching a known GPU (e.g. 15 GiB at 7.5 is a T4) takes its FLOP/s.
    """
    if memory_gib is not None or compute_capability is not None:
        if memory_gib is None or compute_capability is None:
            raise ValueError("describe a GPU with both its memory (GiB) and its compute capability, e.g. 15 and 7.5")
        if isinstance(memory_gib, bool) or not isinstance(memory_gib, numbers.Real) or not 0 < memory_gib < math.inf:
            raise ValueError(f"memory_gib must be a number of GiB above 0, e.g. 15; got {memory_gib!r}")
        capability = tuple(int(x) for x in compute_capability)
        if len(capability) != 2 or capability[0] < 1 or capability[1] < 0:
            raise ValueError(f"compute_capability must be (major, minor) with major >= 1, e.g. (7, 5); "
                             f"got {compute_capability!r}")
        for known in ACCELERATORS.values():
            if known.compute_capability == capability and abs(known.memory_gib - memory_gib) < 1.0:
                return known
        return Accelerator(f"GPU {memory_gib:g} GiB sm_{capability[0]}{capability[1]}", _gib(memory_gib), capability, {})
    device = pick_device(device)
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    name = props.name
    flops = {}
    for key, known in ACCELERATORS.items():
        if key.split("-")[0] in name and (key == "T4" or abs(known.memory_bytes - props.total_memory) < 8 * GIB):
            flops = known.peak_flops
            break
    return Accelerator(name, int(props.total_memory), (props.major, props.minor), flops)


def _storage_bytes(storage, block: int) -> int:
    nbytes = storage.nbytes()
    return int(math.ceil(nbytes / block) * block) if block > 1 else nbytes


class PeakMemory(TorchDispatchMode):
    """Live bytes of every tensor storage made inside the block (and of tensors passed to
    :meth:`track`), and the peak of that sum.

    Each storage is counted once, when first seen, and subtracted when it is freed (a weak
    reference's callback). ``block`` rounds each storage up like the CUDA caching allocator.
    Works on real tensors and on fake ones (``FakeTensorMode``), where nothing is allocated.

        with FakeTensorMode(), PeakMemory() as memory:
            ...                      # build tensors, run a training step
        memory.peak_bytes
    """

    def __init__(self, block: int = 1):
        super().__init__()
        self.block = block
        self.current_bytes = 0
        self.peak_bytes = 0
        self._seen = WeakIdKeyDictionary()
        self._refs = set()

    def track(self, *objects) -> "PeakMemory":
        """Count tensors made before the block: modules' parameters and buffers, optimizers' states, tensors."""
        for obj in objects:
            if isinstance(obj, torch.nn.Module):
                for tensor in list(obj.parameters()) + list(obj.buffers()):
                    self._add(tensor)
            elif isinstance(obj, torch.optim.Optimizer):
                for state in obj.state.values():
                    tree_map_only(torch.Tensor, self._add, state)
            else:
                tree_map_only(torch.Tensor, self._add, obj)
        return self

    def _free(self, nbytes: int, ref) -> None:
        self._refs.discard(ref)
        self.current_bytes -= nbytes

    def _add(self, tensor: torch.Tensor) -> None:
        if tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        if storage in self._seen:
            return
        nbytes = _storage_bytes(storage, self.block)
        self._seen[storage] = nbytes
        ref = weakref.ref(storage, lambda r, n=nbytes: self._free(n, r))
        self._refs.add(ref)
        self.current_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.current_bytes)

    def reset_peak(self) -> None:
        self.peak_bytes = self.current_bytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tree_map_only(torch.Tensor, self._add, out)
        return out
