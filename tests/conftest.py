"""Test set-up: the Triton interpreter must be on before triton is first imported, so that
Triton kernels run on CPU tensors.

Which tests run a Triton kernel is recorded as they run (in pytest's cache, ``r1kernels/triton_tests``);
``--triton-tests`` then runs only those, as scripts/test_lowest_triton.sh does under the lowest Triton
the extras admit, after the suite has run under the newest."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from r1kernels import backends  # noqa: E402

TRITON_TESTS_KEY = "r1kernels/triton_tests"
_launches = [0]                      # Triton kernel launches so far, under the interpreter
_ran_triton: set = set()             # ids of the tests that launched one


def _count_interpreted_launches():
    """Wrap the interpreter's launch (InterpretedFunction.run, in every Triton the extras admit)."""
    if not (backends.triton_available() and backends.triton_interpreting()):
        return
    from triton.runtime.interpreter import InterpretedFunction
    run = InterpretedFunction.run

    def counted(self, *args, **kwargs):
        _launches[0] += 1
        return run(self, *args, **kwargs)

    InterpretedFunction.run = counted


_count_interpreted_launches()


def pytest_addoption(parser):
    parser.addoption("--triton-tests", action="store_true",
                     help="run only the tests that ran a Triton kernel when the suite last ran (all of them if it "
                          "has not run in this checkout)")


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--triton-tests"):
        return
    cache = getattr(config, "cache", None)
    recorded = set(cache.get(TRITON_TESTS_KEY, [])) if cache is not None else set()
    if not recorded:
        print("\n--triton-tests: no record of which tests run Triton kernels (run the suite first): running all")
        return
    keep = [item for item in items if item.nodeid in recorded]
    config.hook.pytest_deselected(items=[item for item in items if item.nodeid not in recorded])
    items[:] = keep


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    before = _launches[0]
    try:
        return (yield)
    finally:
        if _launches[0] > before:
            _ran_triton.add(item.nodeid)


def pytest_sessionfinish(session):
    """Add this run's Triton tests to the record (a partial run adds to it; ids no longer collected are
    dropped the next time --triton-tests runs, by the intersection with what is collected)."""
    cache = getattr(session.config, "cache", None)  # absent under -p no:cacheprovider
    if cache is not None and _ran_triton and not session.config.getoption("--triton-tests"):
        cache.set(TRITON_TESTS_KEY, sorted(set(cache.get(TRITON_TESTS_KEY, [])) | _ran_triton))


def cpu_backends(op: str, on_request: bool = False) -> list[str]:
    """``op``'s backends (its table, in order) that can run on this machine's CPU tensors: triton only
    under the interpreter, cpu where the extension was built, flash_attn never; with ``on_request``
    also the rows ``auto`` never picks (the fused lm_head's triton_tile)."""
    return [name for name, row in backends.table(op).items() if (row.auto or on_request)
            and backends.why_not(op, name, torch.device("cpu")) is None]


def exact_backends(op: str) -> list[str]:
    """``op``'s backends here that run float64 (for gradcheck)."""
    return [name for name in cpu_backends(op) if backends.table(op)[name].float64]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


def assert_close_scaled(actual, expected, rtol, what=""):
    """max |actual - expected| <= rtol * max(1, max |expected|), and no NaN anywhere."""
    actual = actual.double()
    expected = expected.double()
    assert torch.isfinite(actual).all() == torch.isfinite(expected).all(), f"{what}: non-finite mismatch"
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert err <= rtol * scale, f"{what}: max error {err:.3g} > {rtol:.1g} x scale {scale:.3g}"


# Relative tolerances by input dtype: fp32 math on exact inputs, outputs/grads in the input dtype.
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def autocast_grad_errors(backend: str, device: str, seed: int = 0):
    """Relative errors against float64 of (d hidden, d weight, d bias) of sum(g * logp) from the fused
    lm_head inside torch.autocast(bf16) with fp32 leaves: (ours, TRL's ChunkedLogProbFunction's, or
    None where TRL is not installed). Also checks that ours come back fp32, as the leaves."""
    import r1kernels
    from r1kernels.reference import linear_token_logprobs_ref
    gen = torch.Generator().manual_seed(seed)
    leaves = [torch.randn(96, 32, generator=gen), torch.randn(512, 32, generator=gen) * 0.5,
              torch.randn(512, generator=gen)]
    hidden, weight, bias = (x.to(device).requires_grad_() for x in leaves)
    targets = torch.randint(0, 512, (96,), generator=gen).to(device)
    grad = torch.randn(96, generator=gen).to(device)
    exact = [x.detach().double().requires_grad_() for x in (hidden, weight, bias)]
    logp, _ = linear_token_logprobs_ref(exact[0], exact[1], targets, exact[2])
    reference = torch.autograd.grad((logp * grad.double()).sum(), exact)

    def error(grads):
        return tuple(((g.double() - r).norm() / r.norm()).item() for g, r in zip(grads, reference))

    with r1kernels.use_backend(backend), torch.autocast(device, dtype=torch.bfloat16):
        out = r1kernels.linear_token_logprobs(hidden, weight, targets, bias)
        grads = torch.autograd.grad((out * grad).sum(), (hidden, weight, bias))
    assert out.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    try:
        from trl import kernels as trl_kernels
    except ImportError:
        return error(grads), None
    with torch.autocast(device, dtype=torch.bfloat16):
        trl_out = trl_kernels.ChunkedLogProbFunction.apply(hidden, weight, bias, targets, 1.0, 4096, None, 1.0,
                                                          ("log_probs",))[0]
        trl_grads = torch.autograd.grad((trl_out.float() * grad).sum(), (hidden, weight, bias))
    return error(grads), error(trl_grads)
