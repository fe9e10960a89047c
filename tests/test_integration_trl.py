"""TRL drop-in: where TRL is installed, TRL's fused LM head routed through r1kernels gives TRL's
own log-probs, entropies, GRPO loss and parameter gradients on a tiny Qwen2 model."""
import pytest
import torch

trl_utils = pytest.importorskip("trl.trainer.utils")
transformers = pytest.importorskip("transformers")

import r1kernels  # noqa: E402
import r1kernels.integrations.trl as r1k_trl  # noqa: E402
from r1kernels.reference import grpo_loss_ref  # noqa: E402


def _tiny_model():
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=131, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.Qwen2ForCausalLM(config)
    trl_utils.add_fused_lm_head(model, temperature=0.7, outputs=("log_probs", "entropy"))
    return model


def _grpo_step(model, ids, labels, adv, old):
    out = model(input_ids=ids, labels=labels, fused_lm_head=True)
    mask = labels[:, 1:] != -100
    loss = grpo_loss_ref(out.log_probs.double(), adv, mask, old, loss_type="grpo", beta=0.0)
    model.zero_grad()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, loss, grads


def test_patched_trl_matches_trl_and_r1kernels_loss():
    model = _tiny_model()
    ids = torch.randint(0, 131, (3, 12))
    labels = ids.clone()
    labels[:, :5] = -100                   # prompt tokens
    labels[1, 9:] = -100                   # a shorter completion
    adv = torch.tensor([1.0, -0.5, 0.25], dtype=torch.float64)
    old = -torch.rand(3, 11, dtype=torch.float64)

    trl_out, trl_loss, trl_grads = _grpo_step(model, ids, labels, adv, old)
    r1k_trl.patch()
    try:
        assert r1k_trl.is_patched()
        ours_out, ours_loss, ours_grads = _grpo_step(model, ids, labels, adv, old)
    finally:
        r1k_trl.unpatch()
    assert not r1k_trl.is_patched()
    torch.testing.assert_close(ours_out.log_probs, trl_out.log_probs, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(ours_out.entropy, trl_out.entropy, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(ours_loss, trl_loss, atol=1e-6, rtol=1e-5)
    assert trl_grads.keys() == ours_grads.keys() and "lm_head.weight" in ours_grads
    for name in trl_grads:
        torch.testing.assert_close(ours_grads[name], trl_grads[name], atol=1e-6, rtol=1e-4, msg=name)

    # and r1kernels' own linear_grpo_loss on the backbone's hidden states gives that same loss
    hidden = model.model(input_ids=ids).last_hidden_state[:, :-1]
    mask = labels[:, 1:] != -100
    ours_direct = r1kernels.linear_grpo_loss(hidden, model.lm_head.weight, labels[:, 1:], adv.float(), mask,
                                             temperature=0.7, old_logprobs=old.float())
    torch.testing.assert_close(ours_direct.loss.double(), trl_loss, atol=1e-6, rtol=1e-5)


def test_unsupported_calls_fall_back_to_trl():
    model = _tiny_model()
    ids = torch.randint(0, 131, (2, 8))
    r1k_trl.patch()
    try:
        with pytest.warns(UserWarning, match="falling back"):
            h = torch.randn(5, 32)
            w = torch.randn(131, 32)
            r1k_trl._R1KernelsLogProbs._warned = False
            out = trl_utils._ChunkedLogProbFunction.apply(h, w, None, torch.randint(0, 131, (5,)), 1.0, 4096, 30.0,
                                                         1.0, ("log_probs",))
        assert out[0].shape == (5,)
        assert model(input_ids=ids, labels=ids, fused_lm_head=True).log_probs.shape == (2, 7)
    finally:
        r1k_trl.unpatch()
