"""Argument checks shared by the public ops: clear errors that name the argument."""
from __future__ import annotations

import math
import os

import torch

from r1kernels import backends
from r1kernels.constants import IGNORE_INDEX

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def floating(name: str, value) -> torch.Tensor:
    tensor(name, value)
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {value.dtype}")
    return value


def integer_ids(name: str, value) -> torch.Tensor:
    tensor(name, value)
    if value.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be int64 or int32 token ids, got {value.dtype}")
    return value


def positive(name: str, value) -> float:
    """A finite Python number > 0 (not a bool, not a tensor)."""
    if isinstance(value, (torch.Tensor, bool)) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a Python number, got {type(value).__name__}")
    if not 0 < value < float("inf"):
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return float(value)


def positive_count(name: str, value) -> None:
    """A finite count > 0, given as a number or a one-element tensor (TRL passes a tensor): checked on
    the host where :func:`host_checks` allows, else by a device-side assert."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor, got shape {tuple(value.shape)}")
        ok = torch.isfinite(value) & (value > 0)
        if host_checks(value.device):
            if not bool(ok.all()):
                raise ValueError(f"{name} must be finite and > 0, got {value.item()}")
        else:
            torch._assert_async(ok.all(), f"{name} must be finite and > 0")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")


def small_all_finite(name: str, value: torch.Tensor) -> None:
    """No NaN or inf in a small tensor (a few weights): read as a Python list where :func:`host_checks`
    allows, else one device-side assert."""
    if host_checks(value.device):
        values = value.tolist()
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"{name} must be finite, got {values}")
    else:
        torch._assert_async(torch.isfinite(value).all(), f"{name} must be finite")


# what the released-parameter errors advise: the engines gather a parameter for its module's forward
# and arm its gathering for the backward that forward starts, so that is where a fused op must read it
_INSIDE_FORWARD = ("run the op inside the forward of the module that owns it, where the engine gathers it for the "
                   "op and for its backward (r1kernels.integrations.trl.patch(loss=True) runs the loss inside "
                   "lm_head's forward)")


def whole_parameter(name: str, value: torch.Tensor) -> None:
    """A weight the op can read whole: not an FSDP2 shard (a DTensor), not a DeepSpeed ZeRO-3 parameter
    partitioned away, not a tensor whose storage an engine has freed. Each raises, naming the cause
    and the fix, where the kernels would otherwise fail on a shape or read freed memory. Skipped
    while compiling (the attributes are not traceable); the custom ops check the storage then."""
    if torch.compiler.is_compiling():
        return
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor
        if isinstance(value, DTensor):
            raise TypeError(f"{name} is a DTensor (placements {tuple(value.placements)}, an FSDP2 or "
                            f"tensor-parallel shard of {tuple(value.shape)}); r1kernels' ops take whole local tensors: "
                            f"{_INSIDE_FORWARD}. (.full_tensor() gives a whole tensor, but its backward does not "
                            "reduce the gradient across data-parallel ranks)")
    full_shape = getattr(value, "ds_shape", None)     # DeepSpeed ZeRO-3 marks its parameters so
    if full_shape is not None and tuple(value.shape) != tuple(full_shape):
        raise RuntimeError(f"{name} is a DeepSpeed ZeRO-3 parameter partitioned away (its data has shape "
                           f"{tuple(value.shape)}, the parameter {tuple(full_shape)}): {_INSIDE_FORWARD}, or gather it "
                           "with deepspeed.zero.GatheredParameters")
    storage_present(name, value)


def storage_present(name: str, value: torch.Tensor) -> None:
    """The tensor's storage holds every element its shape and strides address. FSDP frees a parameter's
    unsharded storage when it reshards (resize to 0 bytes) and ZeRO-3 when it releases a gathered one,
    leaving the tensor's shape as it was: a kernel handed its pointer would read freed memory."""
    if value.numel() == 0 or value.device.type == "meta":
        return
    extent = value.storage_offset() + 1 + sum((size - 1) * stride for size, stride in zip(value.shape, value.stride()))
    have = value.untyped_storage().nbytes()
    if have < extent * value.element_size():
        raise RuntimeError(f"{name} has been released: its storage holds {have} bytes, its shape "
                           f"{tuple(value.shape)} needs {extent * value.element_size()} (FSDP frees a parameter when "
                           f"it reshards after its module's forward, ZeRO-3 when it releases one): {_INSIDE_FORWARD}")


def same_device(**tensors) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"tensors must share one device, got {devices}")


def target_ids_in_range(targets: torch.Tensor, vocab: int) -> None:
    """Every id lies in [0, vocab) or equals IGNORE_INDEX. One fused reduction, one sync."""
    if targets.numel() == 0:
        return
    bad = ((targets < 0) & (targets != IGNORE_INDEX)) | (targets >= vocab)
    if bool(bad.any()):
        first = targets[bad][0].item()
        raise ValueError(f"targets holds id {first} outside [0, {vocab}) (use {IGNORE_INDEX} for a masked token)")


def backend_dtype(op: str, backend: str, name: str, value: torch.Tensor) -> None:
    """float64 runs on the exact backends only (``float64`` in the op's table): GPU kernels accumulate in fp32."""
    if value.dtype == torch.float64 and not backends.table(op)[backend].float64:
        raise TypeError(f"{name} is float64, which the {backend!r} backend does not run; use cpu or torch")


def host_checks(device: torch.device) -> bool:
    """Whether checks that read tensor values on the host run. ``R1K_CHECKS=1``: always; ``=0``:
    never; unset: for CPU tensors only, since on an accelerator each such read is a device-to-host
    sync. Where they do not run, a device-side assert (``torch._assert_async``) stands in: it also
    holds inside a compiled graph, and on CUDA it aborts the process with its message."""
    setting = os.environ.get("R1K_CHECKS", "")
    if setting not in ("", "0", "1"):
        raise ValueError(f"R1K_CHECKS must be 0 or 1, got {setting!r}")
    if torch.compiler.is_compiling():
        return False
    return setting == "1" or (setting == "" and device.type == "cpu")


def cu_seqlens(name: str, value: torch.Tensor, total: int, max_len: int | None = None,
               max_name: str = "max_seqlen") -> None:
    """[S+1] int32/int64 offsets: starts at 0, never decreases, ends at ``total``; with ``max_len``,
    no sequence is longer than it. Host checks with a ValueError where :func:`host_checks` allows,
    else one device-side assert."""
    if value.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 (flash-attn convention) or int64, got {value.dtype}")
    if value.dim() != 1 or value.shape[0] < 1:
        raise ValueError(f"{name} must be 1-D [S+1], got shape {tuple(value.shape)}")
    lengths = value[1:] - value[:-1]
    if not host_checks(value.device):
        ok = (value[0] == 0) & (value[-1] == total) & (lengths >= 0).all()
        if max_len is not None and lengths.numel():
            ok = ok & (lengths.max() <= max_len)
        torch._assert_async(ok, f"{name} must start at 0, be non-decreasing and end at the number of tokens {total}"
                            + (f", with no sequence longer than {max_name} = {max_len}" if max_len is not None else ""))
        return
    if int(value[0]) != 0:
        raise ValueError(f"{name} must start at 0, got {int(value[0])}")
    if lengths.numel() and bool((lengths < 0).any()):
        raise ValueError(f"{name} must be non-decreasing")
    if int(value[-1]) != total:
        raise ValueError(f"{name} must end at the number of tokens {total}, got {int(value[-1])}")
    longest = int(lengths.max()) if lengths.numel() else 0
    if max_len is not None and max_len < longest:
        raise ValueError(f"{max_name} = {max_len} is smaller than the longest sequence ({longest})")
