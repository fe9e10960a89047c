"""The sampled float64 references of the GPU tests (tests/sampled_reference.py) equal the full
float64 reference on the rows and vocabulary entries they sample, on CPU."""
import torch
from sampled_reference import linear_token_logprobs_rows, sample_indices, token_logprobs_rows

from r1kernels.reference import linear_token_logprobs_ref, token_logprobs_ref


def _full_grads(leaves, outputs, grad_logp, grad_entropy):
    logp, entropy = outputs
    return torch.autograd.grad((logp * grad_logp.double()).sum() + (entropy * grad_entropy.double()).sum(), leaves)


def test_token_logprobs_rows_match_the_full_reference():
    n, v = 37, 301
    logits = torch.randn(n, v) * 3
    targets = torch.randint(0, v, (n,))
    targets[5] = -100
    g_logp, g_ent = torch.randn(n), torch.randn(n)
    rows = sample_indices(n, 9, "cpu")
    assert rows[0] == 0 and rows[-1] == n - 1
    x = logits.double().requires_grad_()
    full = token_logprobs_ref(x, targets, 0.7)
    (d_logits,) = _full_grads([x], full, g_logp, g_ent)
    logp, entropy, d_rows = token_logprobs_rows(logits, targets, rows, g_logp, g_ent, 0.7)
    torch.testing.assert_close(logp, full[0][rows].detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(entropy, full[1][rows].detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(d_rows, d_logits[rows], rtol=1e-10, atol=1e-12)


def test_linear_token_logprobs_rows_match_the_full_reference():
    n, h, v = 45, 16, 203
    hidden = torch.randn(n, h).bfloat16()
    weight = (torch.randn(v, h) / 2).bfloat16()
    targets = torch.randint(0, v, (n,))
    targets[[3, 44]] = -100
    g_logp, g_ent = torch.randn(n), torch.randn(n)
    rows, cols = sample_indices(n, 7, "cpu"), sample_indices(v, 11, "cpu")
    leaves = [hidden.double().requires_grad_(), weight.double().requires_grad_()]
    full = linear_token_logprobs_ref(leaves[0], leaves[1], targets)
    d_hidden, d_weight = _full_grads(leaves, full, g_logp, g_ent)
    logp, entropy, dh, dw = linear_token_logprobs_rows(hidden, weight, targets, rows, cols, g_logp, g_ent, chunk=16)
    torch.testing.assert_close(logp, full[0][rows].detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(entropy, full[1][rows].detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dh, d_hidden[rows], rtol=1e-10, atol=1e-12)
    # d weight's full-row statistics come from fp32-accumulated logits: about 1e-7 relative
    torch.testing.assert_close(dw, d_weight[cols], rtol=1e-5, atol=1e-6)
