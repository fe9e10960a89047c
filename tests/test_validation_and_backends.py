"""Bad input raises a clear error naming the argument; backend forcing never falls back silently."""
import pytest
import torch
from conftest import cpu_backends

import r1kernels
from r1kernels import backends


def _ok():
    return torch.randn(4, 10), torch.randint(0, 10, (4,))


@pytest.mark.parametrize("mutate, error, words", [
    (lambda x, t: (x.long(), t), TypeError, "logits"),
    (lambda x, t: ([1.0], t), TypeError, "logits"),
    (lambda x, t: (x, t.float()), TypeError, "targets"),
    (lambda x, t: (x, t[:3]), ValueError, "targets must have shape"),
    (lambda x, t: (x.unsqueeze(0), t), ValueError, "targets must have shape"),
    (lambda x, t: (x, torch.tensor([0, 1, 10, 2])), ValueError, "outside [0, 10)"),
    (lambda x, t: (x, torch.tensor([0, -1, 3, 2])), ValueError, "outside [0, 10)"),
])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_token_logprobs_rejects(mutate, error, words, backend):
    if backend == "cpu" and not backends.extension_available():
        pytest.skip("extension not built")
    x, t = mutate(*_ok())
    with r1kernels.use_backend(backend), pytest.raises(error, match=words.replace("[", r"\[").replace(")", r"\)")):
        r1kernels.token_logprobs(x, t)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan")])
def test_bad_temperature(temperature):
    x, t = _ok()
    with pytest.raises(ValueError, match="temperature"):
        r1kernels.token_logprobs(x, t, temperature=temperature)
    with pytest.raises(ValueError, match="temperature"):
        r1kernels.linear_token_logprobs(torch.randn(4, 3), torch.randn(10, 3), t, temperature=temperature)


def test_linear_rejects():
    h, w, t = torch.randn(4, 3), torch.randn(10, 3), torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match="weight must have shape"):
        r1kernels.linear_token_logprobs(h, torch.randn(10, 4), t)
    with pytest.raises(TypeError, match="weight dtype"):
        r1kernels.linear_token_logprobs(h, w.double(), t)
    with pytest.raises(ValueError, match="bias must have shape"):
        r1kernels.linear_token_logprobs(h, w, t, bias=torch.randn(9))
    with pytest.raises(ValueError, match=r"outside \[0, 10\)"):
        r1kernels.linear_token_logprobs(h, w, torch.tensor([0, 1, 2, 11]))
    with pytest.raises(ValueError, match="targets must have shape"):
        r1kernels.linear_token_logprobs(h, w, t[:2])
    with pytest.raises(TypeError, match="hidden"):
        r1kernels.linear_token_logprobs(h.int(), w, t)


def test_unknown_backend_and_forced_backend_that_cannot_run(monkeypatch):
    x, t = _ok()
    with pytest.raises(ValueError, match="unknown backend"):
        with r1kernels.use_backend("nope"):
            pass
    monkeypatch.setenv("R1K_BACKEND", "bogus")
    with pytest.raises(ValueError, match="R1K_BACKEND"):
        r1kernels.token_logprobs(x, t)
    monkeypatch.setenv("R1K_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="cuda backend needs CUDA tensors"):
        r1kernels.token_logprobs(x, t)
    monkeypatch.delenv("R1K_BACKEND")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with r1kernels.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        r1kernels.token_logprobs(x, t)


def test_auto_on_cpu_prefers_the_extension(monkeypatch):
    monkeypatch.delenv("R1K_BACKEND", raising=False)
    expected = "cpu" if backends.extension_available() else "torch"
    assert backends.resolve("logprobs", torch.device("cpu")) == expected
    with r1kernels.use_backend("torch"):
        assert backends.resolve("logprobs", torch.device("cpu")) == "torch"
        with r1kernels.use_backend("cpu" if backends.extension_available() else "torch"):
            assert backends.resolve("logprobs", torch.device("cpu")) == expected
        assert backends.resolve("logprobs", torch.device("cpu")) == "torch"


def test_float64_on_triton_is_refused():
    if not backends.triton_interpreting():
        pytest.skip("needs the Triton interpreter")
    with r1kernels.use_backend("triton"), pytest.raises(TypeError, match="float64"):
        r1kernels.token_logprobs(torch.randn(2, 5, dtype=torch.float64), torch.tensor([0, 1]))


def test_backend_per_op(monkeypatch):
    """A plain name forces the ops that have it and leaves the others on auto; op:name forces one op
    and raises if that op lacks the backend; the innermost use_backend wins."""
    cpu = torch.device("cpu")
    auto_logprobs = backends.resolve("logprobs", cpu)
    monkeypatch.setenv("R1K_BACKEND", "torch")
    assert backends.resolve("logprobs", cpu) == "torch"
    monkeypatch.setenv("R1K_BACKEND", "attention:torch")
    assert backends.resolve("logprobs", cpu) == auto_logprobs
    assert backends.resolve("attention", cpu) == "torch"
    monkeypatch.setenv("R1K_BACKEND", "flash_attn")          # only attention has it; on CPU it cannot run
    assert backends.resolve("logprobs", cpu) == auto_logprobs
    with pytest.raises(RuntimeError, match="flash"):
        backends.resolve("attention", cpu)
    monkeypatch.setenv("R1K_BACKEND", "logprobs:flash_attn")
    with pytest.raises(ValueError, match="'flash_attn' does not implement logprobs"):
        backends.resolve("logprobs", cpu)
    monkeypatch.setenv("R1K_BACKEND", "softmax:torch")
    with pytest.raises(ValueError, match="unknown op 'softmax'"):
        backends.resolve("logprobs", cpu)
    monkeypatch.setenv("R1K_BACKEND", "torch,logprobs:auto")
    assert backends.resolve("logprobs", cpu) == auto_logprobs
    assert backends.resolve("advantages", cpu) == "torch"
    with r1kernels.use_backend(advantages="torch"):
        assert backends.resolve("logprobs", cpu) == auto_logprobs, "use_backend replaces R1K_BACKEND"
        assert backends.resolve("advantages", cpu) == "torch"


SILENT_BEFORE = [
    # (what, call, exception, words in the message)
    ("temperature inf", lambda: r1kernels.token_logprobs(torch.randn(2, 5), torch.tensor([0, 1]), float("inf")),
     ValueError, "temperature"),
    ("temperature True", lambda: r1kernels.token_logprobs(torch.randn(2, 5), torch.tensor([0, 1]), True),
     TypeError, "temperature"),
    ("bias dtype", lambda: r1kernels.linear_token_logprobs(torch.randn(2, 4), torch.randn(6, 4), torch.tensor([0, 1]),
                                                          bias=torch.randn(6, dtype=torch.float64)),
     TypeError, "bias dtype"),
    ("inplace_backward on expanded logits",
     lambda: r1kernels.token_logprobs(torch.randn(1, 5).expand(3, 5), torch.tensor([0, 1, 2]), inplace_backward=True),
     ValueError, "inplace_backward"),
    ("num_items_in_batch 0", lambda: r1kernels.policy_loss(torch.randn(2, 3), torch.randn(2), loss_type="dapo",
                                                           num_items_in_batch=0), ValueError, "num_items_in_batch"),
    ("num_items_in_batch -3 tensor", lambda: r1kernels.policy_loss(torch.randn(2, 3), torch.randn(2), loss_type="dapo",
                                                                   num_items_in_batch=torch.tensor(-3.0)),
     ValueError, "num_items_in_batch"),
    ("per-token or per-sequence advantages", lambda: r1kernels.policy_loss(
        torch.randn(3), torch.randn(3), cu_seqlens=torch.tensor([0, 2, 2, 3], dtype=torch.int32)),
     ValueError, "advantages has 3 values"),
    ("NaN reward weight", lambda: r1kernels.group_advantages(torch.randn(4, 2), 2,
                                                             reward_weights=torch.tensor([1.0, float("nan")])),
     ValueError, "reward_weights must be finite"),
    ("unpack past N", lambda: r1kernels.unpack(torch.arange(5), torch.tensor([0, 3, 7])), ValueError, "cu_seqlens"),
    ("unpack decreasing", lambda: r1kernels.unpack(torch.arange(5), torch.tensor([0, 4, 2, 5])), ValueError,
     "non-decreasing"),
    ("unpack negative", lambda: r1kernels.unpack(torch.arange(5), torch.tensor([-1, 2, 5])), ValueError,
     "start at 0"),
    ("pack mixed dtypes", lambda: r1kernels.pack([torch.arange(3), torch.arange(2).int()]), TypeError,
     r"sequences\[1\]"),
    ("plan negative length", lambda: r1kernels.plan_micro_batches([3, -1], 8), ValueError, r"lengths\[1\]"),
    ("plan NaN budget", lambda: r1kernels.plan_micro_batches([3, 1], float("nan")), ValueError, "max_tokens"),
]


@pytest.mark.parametrize("what, call, error, words", SILENT_BEFORE, ids=[c[0] for c in SILENT_BEFORE])
def test_inputs_that_used_to_pass_silently_now_raise(what, call, error, words):
    with pytest.raises(error, match=words):
        call()


@pytest.mark.parametrize("backend", cpu_backends())
def test_infinite_reward_is_a_failed_reward(backend):
    """+-inf is a reward function's failure, like NaN: advantage 0, the rest of its group unaffected,
    counted in the stats."""
    rewards = torch.tensor([1.0, 2.0, 4.0, float("inf"), 3.0, 0.0, float("-inf"), 5.0])
    as_nan = torch.where(torch.isinf(rewards), torch.nan, rewards)
    with r1kernels.use_backend(advantages=backend):
        adv, stats = r1kernels.group_advantages(rewards, 4, return_stats=True)
        expected = r1kernels.group_advantages(as_nan, 4)
    assert torch.isfinite(adv).all() and adv[3] == 0 and adv[6] == 0
    torch.testing.assert_close(adv, expected)
    assert int(stats.failed_rewards) == 2


def _cu(*bounds):
    return torch.tensor(bounds, dtype=torch.int32)


# (op (its name in backends.OPS), case, call, exception, the argument the message must name); each row runs
# on every backend of that op that runs on this machine's CPU
INVALID = [
    ("logprobs", "logits int",
     lambda: r1kernels.token_logprobs(torch.ones(2, 5, dtype=torch.long), torch.tensor([0, 1])), TypeError, "logits"),
    ("logprobs", "target past V", lambda: r1kernels.token_logprobs(torch.randn(2, 5), torch.tensor([0, 5])),
     ValueError, "targets"),
    ("logprobs", "temperature NaN",
     lambda: r1kernels.token_logprobs(torch.randn(2, 5), torch.tensor([0, 1]), float("nan")), ValueError,
     "temperature"),
    ("linear_logprobs", "weight shape", lambda: r1kernels.linear_token_logprobs(torch.randn(2, 4), torch.randn(6, 3),
                                                                                torch.tensor([0, 1])),
     ValueError, "weight"),
    ("linear_logprobs", "bias shape", lambda: r1kernels.linear_token_logprobs(torch.randn(2, 4), torch.randn(6, 4),
                                                                              torch.tensor([0, 1]), torch.randn(5)),
     ValueError, "bias"),
    ("linear_logprobs", "targets shape", lambda: r1kernels.linear_token_logprobs(torch.randn(2, 4), torch.randn(6, 4),
                                                                                 torch.tensor([0])),
     ValueError, "targets"),
    ("advantages", "group size not dividing", lambda: r1kernels.group_advantages(torch.randn(5), 2),
     ValueError, "group_size"),
    ("advantages", "group ids shape",
     lambda: r1kernels.group_advantages(torch.randn(4), group_ids=torch.zeros(3).long()), ValueError, "group_ids"),
    ("advantages", "unknown estimator", lambda: r1kernels.group_advantages(torch.randn(4), 2, estimator="ppo"),
     ValueError, "estimator"),
    ("attention", "offsets past total", lambda: r1kernels.varlen_attention(
        torch.randn(5, 2, 8), torch.randn(5, 2, 8), torch.randn(5, 2, 8), _cu(0, 3, 6), _cu(0, 3, 6), 3, 3),
     ValueError, "cu_seqlens_q"),
    ("attention", "offsets int64", lambda: r1kernels.varlen_attention(
        torch.randn(5, 2, 8), torch.randn(5, 2, 8), torch.randn(5, 2, 8), _cu(0, 5).long(), _cu(0, 5), 5, 5),
     TypeError, "cu_seqlens_q"),
    ("attention", "heads not grouped", lambda: r1kernels.varlen_attention(
        torch.randn(5, 3, 8), torch.randn(5, 2, 8), torch.randn(5, 2, 8), _cu(0, 5), _cu(0, 5), 5, 5),
     ValueError, "Hq"),
    ("attention", "max_seqlen too small", lambda: r1kernels.varlen_attention(
        torch.randn(5, 2, 8), torch.randn(5, 2, 8), torch.randn(5, 2, 8), _cu(0, 5), _cu(0, 5), 4, 5),
     ValueError, "max_seqlen_q"),
    ("attention", "head dim 300", lambda: r1kernels.varlen_attention(
        torch.randn(5, 2, 300), torch.randn(5, 2, 300), torch.randn(5, 2, 300), _cu(0, 5), _cu(0, 5), 5, 5),
     ValueError, "head_dim"),
    ("attention", "sinks shape", lambda: r1kernels.varlen_attention(
        torch.randn(5, 2, 8), torch.randn(5, 2, 8), torch.randn(5, 2, 8), _cu(0, 5), _cu(0, 5), 5, 5,
        sinks=torch.zeros(3)), ValueError, "sinks"),
]


def _backends_of(op):
    """The op's backends that run on this machine's CPU (backends.OP_BACKENDS states what it supports)."""
    return [b for b in cpu_backends() if b in backends.OP_BACKENDS[op]]


@pytest.mark.parametrize("op, case, call, error, argument",
                         [(op, case, call, error, arg) for op, case, call, error, arg in INVALID],
                         ids=[f"{op}-{case}" for op, case, *_ in INVALID])
def test_invalid_inputs_name_the_argument_on_every_backend(op, case, call, error, argument):
    for backend in _backends_of(op):
        with r1kernels.use_backend(**{op: backend}), pytest.raises(error) as raised:
            call()
        assert argument in str(raised.value), f"{backend}: {raised.value!r} does not name {argument}"



def _empty(shape, strides, requires_grad=True):
    """An empty tensor with the given strides: empty tensors are 'contiguous' whatever theirs are."""
    return torch.empty_strided(shape, strides).requires_grad_(requires_grad)


V, D = 7, 5


def _ids(*shape):
    return torch.zeros(shape, dtype=torch.long)


def _q():
    return _empty((0, 2, 16), (1, 0, 0)), _empty((0, 2, 16), (0, 1, 0)), _empty((0, 2, 16), (0, 0, 0))


# op: (its inputs, some empty with odd strides; the call). torch.randn(0, 1) * 0.1 has strides (1, 0),
# which the cpu backend's "unit vocab stride" check refused; B = 0 broke the losses' per-sequence sums
EMPTY_CALLS = {
    "token_logprobs": (lambda: [_empty((0, V), (1, 0)), _ids(0)],
                       lambda x, t: r1kernels.token_logprobs(x, t, return_entropy=True)),
    "token_logprobs [B, 0, V]": (lambda: [_empty((3, 0, V), (0, 1, 0)), _ids(3, 0)], r1kernels.token_logprobs),
    "linear_token_logprobs": (lambda: [_empty((0, D), (1, 0)), torch.randn(V, D, requires_grad=True), _ids(0)],
                              r1kernels.linear_token_logprobs),
    "grpo_loss, B = 0": (lambda: [_empty((0, 3, V), (0, 0, 0)), _ids(0, 3), torch.zeros(0)], r1kernels.grpo_loss),
    "grpo_loss, T = 0": (lambda: [_empty((2, 0, V), (1, 0, 1)), _ids(2, 0), torch.ones(2)], r1kernels.grpo_loss),
    "linear_grpo_loss": (lambda: [_empty((0, 3, D), (1, 0, 0)), torch.randn(V, D, requires_grad=True), _ids(0, 3),
                                  torch.zeros(0)], r1kernels.linear_grpo_loss),
    "policy_loss": (lambda: [_empty((0, 3), (1, 0)), torch.zeros(0)],
                    lambda logp, adv: r1kernels.policy_loss(logp, adv, loss_type="dapo")),
    "group_advantages": (lambda: [_empty((0,), (0,), False)], lambda r: r1kernels.group_advantages(r, group_size=4)),
    "group_advantages [0, R], ids": (lambda: [_empty((0, 2), (1, 0), False), _ids(0)],
                                     lambda r, ids: r1kernels.group_advantages(r, group_ids=ids)),
    "varlen_attention": (lambda: [*_q(), torch.zeros(1, dtype=torch.int32)],
                         lambda q, k, v, cu: r1kernels.varlen_attention(q, k, v, cu, cu, 0, 0, causal=True)),
}


@pytest.mark.parametrize("op", list(EMPTY_CALLS))
@pytest.mark.parametrize("backend", cpu_backends())
def test_empty_inputs_with_any_strides_give_empty_results(op, backend):
    """Every op, on every backend: empty outputs (a loss of 0 over no tokens) and, backward, a gradient
    of each differentiable input's shape (zeros for the lm_head weight)."""
    make, call = EMPTY_CALLS[op]
    inputs = make()
    with r1kernels.use_backend(backend):
        out = call(*inputs)
    outputs = [out.loss] if hasattr(out, "loss") else list(out) if isinstance(out, tuple) else [out]
    for value in outputs:
        if value.dim() == 0:
            assert value.item() == 0.0, "the loss over no tokens is 0"
        else:
            assert value.numel() == 0
    leaves = [x for x in inputs if x.requires_grad]
    if leaves:
        with r1kernels.use_backend(backend):
            sum(value.sum() for value in outputs).backward()
        for x in leaves:
            assert x.grad is not None and x.grad.shape == x.shape and not x.grad.any()
