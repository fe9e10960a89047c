"""Tiny random Qwen2 and Llama (built from configs, no downloads) on packed batches through the
"r1kernels" attention: every token's logits and every parameter gradient equal those of running
each sequence alone with transformers' own eager attention."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

import r1kernels  # noqa: E402
import r1kernels.integrations.transformers as r1k_hf  # noqa: E402
from conftest import cpu_backends  # noqa: E402

LENGTHS = [7, 12, 1, 5]


def _config(kind):
    common = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    if kind == "qwen2":
        return transformers.Qwen2Config(**common)
    return transformers.LlamaConfig(**common)


def _model(kind, attn):
    torch.manual_seed(0)
    cls = transformers.Qwen2ForCausalLM if kind == "qwen2" else transformers.LlamaForCausalLM
    r1k_hf.register()
    model = cls(_config(kind)).float()
    model.set_attn_implementation(attn)
    return model


def _per_sequence_reference(kind, seqs, weights):
    model = _model(kind, "eager")
    logits = []
    for s, w in zip(seqs, weights):
        out = model(input_ids=s[None]).logits[0]
        (out * w).sum().backward()
        logits.append(out.detach())
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return torch.cat(logits), grads


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
@pytest.mark.parametrize("explicit_cu_seqlens", [False, True])
@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b in ("torch", "triton")])
def test_packed_equals_unpacked(kind, explicit_cu_seqlens, backend):
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 97, (n,), generator=gen) for n in LENGTHS]
    weights = [torch.randn(n, 97, generator=gen) for n in LENGTHS]
    ref_logits, ref_grads = _per_sequence_reference(kind, seqs, weights)

    model = _model(kind, r1k_hf.NAME)
    packed = r1kernels.pack(seqs)
    kwargs = dict(input_ids=packed.input_ids[None], position_ids=packed.position_ids[None])
    if explicit_cu_seqlens:
        kwargs.update(cu_seq_lens_q=packed.cu_seqlens, cu_seq_lens_k=packed.cu_seqlens,
                      max_length_q=packed.max_seqlen, max_length_k=packed.max_seqlen)
    with r1kernels.use_backend(backend):
        logits = model(**kwargs).logits[0]
        (logits * torch.cat(weights)).sum().backward()
    torch.testing.assert_close(logits, ref_logits, atol=2e-5, rtol=1e-4)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, ref_grads[name], atol=5e-5, rtol=1e-3, msg=name)


def test_padded_batch_with_attention_mask_matches_eager():
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 97, (3, 9), generator=gen)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, :4] = 0          # left padding
    mask[2, 6:] = 0          # right padding
    eager = _model("qwen2", "eager")(input_ids=ids, attention_mask=mask).logits
    ours = _model("qwen2", r1k_hf.NAME)(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(ours[keep], eager[keep], atol=2e-5, rtol=1e-4)
