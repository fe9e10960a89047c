"""Backend selection (r1kernels.backends): each op's table is what dispatch accepts; forcing never falls
back silently; a plain name forces the ops that have it, op:name one op."""
import pytest
import torch

import r1kernels
from r1kernels import backends


def _ok():
    return torch.randn(4, 10), torch.randint(0, 10, (4,))


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


def test_op_backends_table_is_what_dispatch_accepts():
    """Forcing an op onto a backend outside its table raises; inside it, dispatch takes it (or says why
    it cannot run on this machine)."""
    for op in backends.OPS:
        supported = backends.table(op)
        for name in backends.all_names():
            if name == "auto":
                continue
            with backends.use_backend(**{op: name}):
                if name not in supported:
                    with pytest.raises(ValueError, match="does not implement"):
                        backends.resolve(op, torch.device("cpu"))
                    continue
                try:
                    assert backends.resolve(op, torch.device("cpu")) == name
                except RuntimeError as error:            # the op has it, this machine cannot run it
                    assert "cannot run" in str(error)
