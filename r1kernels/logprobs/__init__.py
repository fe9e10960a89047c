"""Per-token log-probs and entropy over the vocabulary: two ops, from logits (``token_logprobs``) or
fused with the lm_head (``linear_token_logprobs``; the [tokens, V] logits never exist).

    logp_i = log softmax(logits_i / T)[t_i]        H_i = -sum_v p_iv log p_iv

Both are fp32 (fp64 for fp64 inputs) whatever the input dtype, and differentiable. This package holds
each op whole: validation, the backend tables, dispatch and autograd (here), the float64 reference
(``reference``), and one module per backend. Each kernel call is a ``torch.library`` custom op, so
``torch.compile(fullgraph=True)`` traces through.

The row-kernel contract, over a [rows, V] logits matrix (``torch_rows``, ``cpp_rows`` for cpu and cuda,
``triton_rows``), which ``token_logprobs`` and the chunked lm_head driver (``chunked``) build on:

``forward(logits, targets, inv_temperature) -> (logp, entropy, row_max, row_log_sum)``
    With ``z = logits * inv_temperature`` per row: ``row_max = max_v z_v``,
    ``row_log_sum = log sum_v exp(z_v - row_max)``, ``logp = z_t - row_max - row_log_sum``
    and ``entropy = row_log_sum - sum_v p_v (z_v - row_max)``. Keeping the max apart from
    the log-sum (instead of one log-sum-exp) keeps ``z_v - row_max`` exact, so log-probs
    and gradients stay accurate with logits of 1e4.

``backward(logits, targets, row_max, row_log_sum, entropy, grad_logp, grad_entropy, inv_temperature, out)``
    Writes d logits into ``out`` (which may be ``logits`` itself):
    ``dz_v = g_logp (1[v = t] - p_v) - g_ent p_v (log p_v + H)``, ``d logits = dz * inv_temperature``.
    ``grad_entropy`` may be None. Rows whose target is -100 get zeros.

The fused lm_head contract (``chunked``, which runs the row kernel of the backend of that name, and
``triton_tile``, the fully fused Triton kernel): ``forward(hidden, weight, bias, targets,
inv_temperature, *, backend, deterministic)`` gives the same four statistics, ``backward(hidden, weight,
bias, targets, row_max, row_log_sum, entropy, grad_logp, grad_entropy, inv_temperature, *, backend,
deterministic, needs_grad, wide_grads)`` (d hidden, d weight, d bias); a module that also has
``forward_backward`` can run the one-pass route (``linear_token_logprobs_one_pass``).
"""
from __future__ import annotations

import contextlib

from typing import Optional

import torch
from torch import Tensor

from r1kernels import _checks, backends
from r1kernels._tensors import accumulation_dtype, unit_stride
from r1kernels.backends import Backend

# The backends of each op, in auto's order: a new backend is its module and a row here.
TOKEN_BACKENDS = {
    "triton": Backend(f"{__name__}.triton_rows"),
    "cuda": Backend(f"{__name__}.cpp_rows"),
    "cpu": Backend(f"{__name__}.cpp_rows", float64=True),
    "torch": Backend(f"{__name__}.torch_rows", float64=True),
}
# The chunked driver runs the token op's row kernel of the same name. ``triton_tile``, the fully fused
# Triton kernel (no chunk buffer, the memory-minimal option), runs only when asked for: cuBLAS chunks
# are faster. It is also what ``deterministic=True`` runs on triton: the chunks' cuBLAS sums are
# reproducible but may change with the chunk's row count, which batch invariance forbids.
LINEAR_BACKENDS = {
    "triton": Backend(f"{__name__}.chunked", deterministic="triton_tile"),
    "cuda": Backend(f"{__name__}.chunked"),
    "cpu": Backend(f"{__name__}.chunked", float64=True),
    "torch": Backend(f"{__name__}.chunked", float64=True),
    "triton_tile": Backend(f"{__name__}.triton_tile", runs_on="triton", auto=False),
}


def _row_stats_like(rows: int, like: Tensor):
    return tuple(like.new_empty(rows, dtype=accumulation_dtype(like.dtype)) for _ in range(4))


# ---------------------------------------------------------------- logits op: custom ops


@torch.library.custom_op("r1kernels::token_logprobs_forward", mutates_args=())
def _token_logprobs_forward(logits: Tensor, targets: Tensor, inv_temperature: float,
                            backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _checks.target_ids_in_range(targets, logits.shape[1])
    return backends.kernels("logprobs", backend).forward(logits, targets, inv_temperature)


@_token_logprobs_forward.register_fake
def _(logits, targets, inv_temperature, backend):
    return _row_stats_like(logits.shape[0], logits)


@torch.library.custom_op("r1kernels::token_logprobs_backward", mutates_args=())
def _token_logprobs_backward(logits: Tensor, targets: Tensor, row_max: Tensor, row_log_sum: Tensor,
                             entropy: Tensor, grad_logp: Tensor, grad_entropy: Optional[Tensor],
                             inv_temperature: float, backend: str) -> Tensor:
    return backends.kernels("logprobs", backend).backward(logits, targets, row_max, row_log_sum, entropy, grad_logp,
                                                          grad_entropy, inv_temperature, out=torch.empty_like(logits))


@_token_logprobs_backward.register_fake
def _(logits, targets, row_max, row_log_sum, entropy, grad_logp, grad_entropy, inv_temperature, backend):
    return torch.empty_like(logits)


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, inv_temperature, backend, inplace_backward):
        logp, entropy, row_max, row_log_sum = _token_logprobs_forward(logits, targets, inv_temperature, backend)
        ctx.save_for_backward(logits, targets, row_max, row_log_sum, entropy)
        ctx.inv_temperature, ctx.backend, ctx.inplace_backward = inv_temperature, backend, inplace_backward
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, targets, row_max, row_log_sum, entropy = ctx.saved_tensors
        if grad_logp is None and grad_entropy is None:
            return None, None, None, None, None
        if grad_logp is None:
            grad_logp = torch.zeros_like(entropy)
        args = (logits, targets, row_max, row_log_sum, entropy, grad_logp, grad_entropy, ctx.inv_temperature)
        if ctx.inplace_backward and not torch.compiler.is_compiling():
            # Eager only: d logits overwrite the saved logits, saving one [N, V] buffer.
            grad_logits = backends.kernels("logprobs", ctx.backend).backward(*args, out=logits)
        else:
            grad_logits = _token_logprobs_backward(*args, ctx.backend)
        return grad_logits, None, None, None, None


def token_logprobs(logits: Tensor, targets: Tensor, temperature: float = 1.0, return_entropy: bool = False, *,
                   inplace_backward: bool = False):
    """Log-prob of each target id under ``softmax(logits / temperature)``, and optionally the entropy.

    Args:
        logits: ``[..., V]`` float32, bfloat16, float16 (float64 on the cpu and torch backends).
        targets: ``[...]`` int64/int32 ids in ``[0, V)``; -100 marks a masked token (0 out, no gradient).
        temperature: > 0; logits are divided by it before the softmax.
        return_entropy: also return the entropy ``-sum_v p_v log p_v`` of each token's softmax.
        inplace_backward: in eager mode, write d logits into ``logits``' storage during backward
            (saves one logits-sized buffer; ``logits`` must not be used after backward).

    Returns:
        ``logp`` (shape of ``targets``), or ``(logp, entropy)``; fp32 (fp64 for fp64 logits).
    """
    _checks.floating("logits", logits)
    _checks.integer_ids("targets", targets)
    inv_temperature = 1.0 / _checks.positive("temperature", temperature)
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have shape [..., V] with V >= 1, got {tuple(logits.shape)}")
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"targets must have shape logits.shape[:-1] = {tuple(logits.shape[:-1])}, "
                         f"got {tuple(targets.shape)}")
    _checks.same_device(logits=logits, targets=targets)
    backend = backends.resolve("logprobs", logits.device)
    _checks.backend_dtype("logprobs", backend, "logits", logits)
    vocab = logits.shape[-1]
    logits_2d = logits.reshape(-1, vocab)
    logits_2d = unit_stride(logits_2d)
    if inplace_backward and not torch.compiler.is_compiling() and torch._debug_has_internal_overlap(logits_2d) == 1:
        raise ValueError("inplace_backward=True needs logits whose elements do not share memory; these are "
                         "expanded (a stride of 0): pass logits.contiguous() or inplace_backward=False")
    logp, entropy = _TokenLogprobs.apply(logits_2d, targets.reshape(-1), inv_temperature, backend,
                                         inplace_backward)
    logp = logp.view(targets.shape)
    return (logp, entropy.view(targets.shape)) if return_entropy else logp


# ---------------------------------------------------------------- fused-linear op: custom ops


def _linear_kernels(backend: str, deterministic: bool):
    """The fused lm_head module that runs ``backend`` once ``deterministic`` is taken into account."""
    return backends.kernels("linear_logprobs", backends.effective_backend("linear_logprobs", backend, deterministic))


def _released_check(weight: Tensor, bias: Optional[Tensor]) -> None:
    """Inside the custom ops, on the tensors the kernels get (compiled graphs included): a parameter
    an engine released has a freed storage, never read."""
    _checks.storage_present("weight", weight)
    if bias is not None:
        _checks.storage_present("bias", bias)


@torch.library.custom_op("r1kernels::linear_token_logprobs_forward", mutates_args=())
def _linear_forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                    inv_temperature: float, backend: str, deterministic: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _checks.target_ids_in_range(targets, weight.shape[0])
    _released_check(weight, bias)
    return _linear_kernels(backend, deterministic).forward(hidden, weight, bias, targets, inv_temperature,
                                                           backend=backend, deterministic=deterministic)


@_linear_forward.register_fake
def _(hidden, weight, bias, targets, inv_temperature, backend, deterministic):
    return _row_stats_like(hidden.shape[0], hidden)


@torch.library.custom_op("r1kernels::linear_token_logprobs_backward", mutates_args=())
def _linear_backward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, row_max: Tensor,
                     row_log_sum: Tensor, entropy: Tensor, grad_logp: Tensor, grad_entropy: Optional[Tensor],
                     inv_temperature: float, backend: str, deterministic: bool,
                     needs_grad: list[bool], wide_grads: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(d hidden, d weight, d bias) in the inputs' dtype, or with ``wide_grads`` in the accumulation dtype."""
    _released_check(weight, bias)       # released between the passes: gathered for the forward only
    args = (hidden, weight, bias, targets, row_max, row_log_sum, entropy, grad_logp, grad_entropy, inv_temperature)
    grads = _linear_kernels(backend, deterministic).backward(*args, backend=backend, deterministic=deterministic,
                                                             needs_grad=tuple(needs_grad), wide_grads=wide_grads)
    # custom ops return tensors only: an empty tensor stands for "not needed"
    return tuple(g if g is not None else hidden.new_empty(0) for g in grads)


@_linear_backward.register_fake
def _(hidden, weight, bias, targets, row_max, row_log_sum, entropy, grad_logp, grad_entropy, inv_temperature,
      backend, deterministic, needs_grad, wide_grads):
    likes = (hidden, weight, bias)
    acc = accumulation_dtype(hidden.dtype)
    return tuple(torch.empty_like(like, dtype=acc if wide_grads else like.dtype) if need else hidden.new_empty(0)
                 for like, need in zip(likes, needs_grad))


class _LinearTokenLogprobs(torch.autograd.Function):
    """The fused lm_head op. ``compute_dtype`` (autocast's dtype, or None): the inputs are cast to it
    here, outside autograd, so the kernels of that dtype run in both passes and the gradients come
    back to the leaves in their own dtype from the fp32 accumulators, rounded once (a cast node in
    the graph would round them to compute_dtype first)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, inv_temperature, backend, deterministic, compute_dtype):
        ctx.leaf_dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        if compute_dtype is not None:
            hidden, weight = hidden.to(compute_dtype), weight.to(compute_dtype)
            bias = None if bias is None else bias.to(compute_dtype)
        logp, entropy, row_max, row_log_sum = _linear_forward(hidden, weight, bias, targets, inv_temperature,
                                                              backend, deterministic)
        ctx.save_for_backward(hidden, weight, bias, targets, row_max, row_log_sum, entropy)
        ctx.inv_temperature, ctx.backend, ctx.deterministic = inv_temperature, backend, deterministic
        ctx.wide_grads = compute_dtype is not None
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, targets, row_max, row_log_sum, entropy = ctx.saved_tensors
        needs_grad = [bool(n) for n in ctx.needs_input_grad[:3]]
        if (grad_logp is None and grad_entropy is None) or not any(needs_grad):
            return (None,) * 8
        if grad_logp is None:
            grad_logp = torch.zeros_like(entropy)
        with _autocast_off(hidden):   # a backward run inside autocast: the same kernels as the forward
            grads = _linear_backward(hidden, weight, bias, targets, row_max, row_log_sum, entropy, grad_logp,
                                     grad_entropy, ctx.inv_temperature, ctx.backend, ctx.deterministic, needs_grad,
                                     ctx.wide_grads)
        grads = tuple(g.to(dtype) if need else None for g, need, dtype in zip(grads, needs_grad, ctx.leaf_dtypes))
        return (*grads, None, None, None, None, None)


def linear_token_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Optional[Tensor] = None,
                          temperature: float = 1.0, return_entropy: bool = False, *,
                          deterministic: Optional[bool] = None):
    """``token_logprobs(hidden @ weight.T + bias, targets)`` without ever holding the [tokens, V] logits.

    Args:
        hidden: ``[..., H]`` final hidden states (float32, bfloat16, float16; float64 on cpu/torch).
        weight: ``[V, H]`` lm_head weight, same dtype as ``hidden``. bias: ``[V]`` or None.
        targets: ``[...]`` ids in ``[0, V)`` or -100 (masked: 0 out, no gradient).
        temperature: > 0. return_entropy: also return the per-token entropy.
        deterministic: no atomics in the gradient accumulation, and per-token results that are
            bitwise independent of the other tokens in the batch. Defaults to
            ``torch.are_deterministic_algorithms_enabled()``. On the triton backend it selects the
            fully fused tile kernel's deterministic mode (the default there is cuBLAS chunks with
            Triton row kernels); ``use_backend("triton_tile")`` asks for the fused kernel with atomics.

    Returns:
        ``logp`` (shape of ``targets``) or ``(logp, entropy)``, fp32 (fp64 for fp64 inputs).
    """
    # under autocast, as an nn.Linear there: the lm_head product in the autocast dtype with fp32
    # accumulation (the Function casts; autocast itself is off inside, so both passes run its kernels)
    cast = _autocast_dtype(hidden)
    hidden_2d, weight_2d, targets_1d, inv_temperature, backend, deterministic = _linear_inputs(
        hidden, weight, targets, bias, temperature, deterministic, cast)
    if hidden.shape[-1] == 0:   # no features: the logits are the bias alone (zeros without one), [N, V] is all
        return token_logprobs(torch.nn.functional.linear(hidden, weight, bias), targets, temperature, return_entropy)
    with _autocast_off(hidden):
        logp, entropy = _LinearTokenLogprobs.apply(hidden_2d, weight_2d, bias, targets_1d, inv_temperature,
                                                   backend, deterministic, cast)
    logp = logp.view(targets.shape)
    return (logp, entropy.view(targets.shape)) if return_entropy else logp


def _autocast_dtype(hidden: Tensor) -> Optional[torch.dtype]:
    """The autocast dtype when autocast is on for hidden's device type and would cast hidden (a float
    other than float64, as autocast's own rule), else None."""
    kind = hidden.device.type
    if hidden.is_floating_point() and hidden.dtype != torch.float64 and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return None


def _autocast_off(hidden: Tensor):
    """A context that turns autocast off for hidden's device type where it is on (nothing otherwise)."""
    kind = hidden.device.type
    return torch.autocast(kind, enabled=False) if torch.is_autocast_enabled(kind) else contextlib.nullcontext()


def _linear_inputs(hidden, weight, targets, bias, temperature, deterministic, compute_dtype=None):
    """Validated inputs of the fused lm_head op: (hidden [N, H], weight, targets [N], 1 / T, backend,
    deterministic). With a ``compute_dtype`` (autocast) all three are cast to it, so theirs may differ."""
    _checks.floating("hidden", hidden)
    _checks.floating("weight", weight)
    _checks.whole_parameter("weight", weight)
    _checks.integer_ids("targets", targets)
    inv_temperature = 1.0 / _checks.positive("temperature", temperature)
    if hidden.dim() < 1:
        raise ValueError("hidden must have shape [..., H]")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] < 1:
        raise ValueError(f"weight must have shape [V, H] with H = hidden.shape[-1] = {hidden.shape[-1]}, "
                         f"got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype and compute_dtype is None:
        raise TypeError(f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    if bias is not None:
        _checks.floating("bias", bias)
        _checks.whole_parameter("bias", bias)
        if bias.dtype != weight.dtype and compute_dtype is None:
            raise TypeError(f"bias dtype {bias.dtype} must match weight dtype {weight.dtype}")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"targets must have shape hidden.shape[:-1] = {tuple(hidden.shape[:-1])}, "
                         f"got {tuple(targets.shape)}")
    _checks.same_device(hidden=hidden, weight=weight, bias=bias, targets=targets)
    backend = backends.resolve("linear_logprobs", hidden.device)
    _checks.backend_dtype("linear_logprobs", backend, "hidden", hidden)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    hidden_2d = hidden.reshape(targets.numel(), hidden.shape[-1])     # not -1: H may be 0
    hidden_2d, weight = unit_stride(hidden_2d), unit_stride(weight)
    return hidden_2d, weight, targets.reshape(-1), inv_temperature, backend, bool(deterministic)


def one_pass_blocker(hidden: Tensor, backend: str, deterministic: bool) -> Optional[str]:
    """Why the fused lm_head cannot run one pass here (a key of ``grpo.TWO_PASS_ROUTES``), or None."""
    if not hasattr(_linear_kernels(backend, deterministic), "forward_backward"):
        return "fused_tile"
    if torch.compiler.is_compiling():
        return "compiled"
    if _autocast_dtype(hidden) is not None:
        return "autocast"
    return None


def linear_token_logprobs_one_pass(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Optional[Tensor],
                                   temperature: float, token_grads, deterministic: Optional[bool] = None):
    """The fused lm_head op when the upstream gradient is known chunk by chunk in the forward.

    ``token_grads(rows, logp, entropy) -> (d loss / d logp, d loss / d entropy or None)`` for the
    flattened tokens ``rows`` (a slice). Returns ``None`` when one pass does not apply (the fully
    fused Triton kernel, which needs every row's statistics before any d logits, or a compiled
    graph), else ``(logp [N], entropy [N], (d hidden, d weight, d bias))``, all detached: three
    GEMM-equivalents instead of four (no recomputed logits).
    """
    hidden_2d, weight, targets_1d, inv_temperature, backend, deterministic = _linear_inputs(
        hidden, weight, targets, bias, temperature, deterministic)
    if one_pass_blocker(hidden, backend, deterministic) is not None:
        return None
    _checks.target_ids_in_range(targets_1d, weight.shape[0])
    needs_grad = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    with torch.no_grad():
        (logp, entropy), grads = _linear_kernels(backend, deterministic).forward_backward(
            hidden_2d.detach(), weight.detach(), None if bias is None else bias.detach(), targets_1d,
            inv_temperature, token_grads, needs_grad, backend=backend)
    return logp, entropy, grads
