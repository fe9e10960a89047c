"""The "r1kernels" attention in transformers, as users run it, on tiny random models of eleven
architectures (built from configs, no downloads), against transformers' own eager attention:

- packed batches (position ids restarting, one row or several; the offsets of
  ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``): every token's logits and every
  parameter gradient equal those of each sequence run alone;
- left and right padding with a 2-D mask (batch 1 too, where the model derives position ids);
- greedy ``generate`` with the dynamic and the static cache gives eager's tokens;
- at most one device-to-host read per forward, none per layer.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

transformers = pytest.importorskip("transformers")

import r1kernels  # noqa: E402
import r1kernels.integrations.transformers as r1k_hf  # noqa: E402
from conftest import cpu_backends  # noqa: E402

VOCAB = 97
LENGTHS = [7, 12, 1, 5]
WINDOW = 4              # sliding window of the models that have one: shorter than the sequences
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32)
ALTERNATING = dict(sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"])

ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=WINDOW)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(head_dim=16, query_pre_attn_scalar=16,
                                                         attn_logit_softcapping=5.0, **ALTERNATING)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(head_dim=16, query_pre_attn_scalar=16, **ALTERNATING)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(head_dim=16, num_experts=4, **MOE)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", dict(head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                                                          **ALTERNATING)),
}
# The Triton kernels (under the interpreter) on the architectures that exercise their options:
# plain GQA, softcap with alternating windows, attention sinks.
TRITON_ARCHITECTURES = ("llama", "gemma2", "gpt_oss")


def _model(kind, attn):
    config_name, model_name, extra = ARCHITECTURES[kind]
    torch.manual_seed(0)
    r1k_hf.register()
    config = getattr(transformers, config_name)(**{**COMMON, **extra})
    model = getattr(transformers, model_name)(config).float().eval()
    if kind == "gpt_oss":                      # sinks start at 0 in the init; make them matter
        for layer in model.model.layers:
            torch.nn.init.normal_(layer.self_attn.sinks, std=1.0)
    model.set_attn_implementation(attn)
    return model


def _sequences(seed=1):
    gen = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(1, VOCAB, (n,), generator=gen) for n in LENGTHS]
    weights = [torch.randn(n, VOCAB, generator=gen) for n in LENGTHS]
    return seqs, weights


def _per_sequence_reference(kind, seqs, weights):
    model = _model(kind, "eager")
    logits = []
    for s, w in zip(seqs, weights):
        out = model(input_ids=s[None]).logits[0]
        (out * w).sum().backward()
        logits.append(out.detach())
    return torch.cat(logits), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_matches(logits, ref_logits, model, ref_grads):
    torch.testing.assert_close(logits, ref_logits, atol=3e-5, rtol=1e-4)
    for name, param in model.named_parameters():
        if name in ref_grads:
            torch.testing.assert_close(param.grad, ref_grads[name], atol=1e-4, rtol=1e-3, msg=name)
        else:
            assert param.grad is None or not param.grad.any(), f"{name}: gradient where eager has none"


def _collated(seqs):
    collator = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_position_ids=True)
    batch = collator([{"input_ids": s.tolist()} for s in seqs])
    keys = ("input_ids", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
    return {k: batch[k] for k in keys}


def _backends_for(kind):
    return [b for b in cpu_backends("attention") if b == "torch" or (b == "triton" and kind in TRITON_ARCHITECTURES)]


CASES = [(kind, backend) for kind in ARCHITECTURES for backend in _backends_for(kind)]


@pytest.mark.parametrize("kind, backend", CASES)
@pytest.mark.parametrize("layout", ["position_ids", "collator", "two_rows"])
def test_packed_equals_each_sequence_alone(kind, backend, layout):
    seqs, weights = _sequences()
    ref_logits, ref_grads = _per_sequence_reference(kind, seqs, weights)
    model = _model(kind, r1k_hf.NAME)
    if layout == "collator":
        kwargs = _collated(seqs)
    elif layout == "position_ids":
        packed = r1kernels.pack(seqs)
        kwargs = dict(input_ids=packed.input_ids[None], position_ids=packed.position_ids[None])
    else:   # two rows of 13 tokens, each packing two sequences: [7, 5] + pad-free filler, [12, 1]
        rows = [r1kernels.pack([seqs[0], seqs[3], seqs[2]]), r1kernels.pack([seqs[1], seqs[2]])]
        kwargs = dict(input_ids=torch.stack([r.input_ids for r in rows]),
                      position_ids=torch.stack([r.position_ids for r in rows]))
    with r1kernels.use_backend(backend):
        logits = model(**kwargs).logits
        if layout == "two_rows":   # rows hold sequences 0, 3, 2 and 1, 2: compare each against its reference
            ref = ref_logits.split(LENGTHS)
            torch.testing.assert_close(logits[0], torch.cat([ref[0], ref[3], ref[2]]), atol=3e-5, rtol=1e-4)
            torch.testing.assert_close(logits[1], torch.cat([ref[1], ref[2]]), atol=3e-5, rtol=1e-4)
            return
        logits = logits[0]
        (logits * torch.cat(weights)).sum().backward()
    _assert_matches(logits, ref_logits, model, ref_grads)


@pytest.mark.parametrize("kind", list(ARCHITECTURES))
def test_padding_matches_eager(kind):
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(1, VOCAB, (3, 9), generator=gen)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, :4] = 0          # left padding
    mask[2, 6:] = 0          # right padding
    eager, ours = _model(kind, "eager"), _model(kind, r1k_hf.NAME)
    keep = mask.bool()
    torch.testing.assert_close(ours(input_ids=ids, attention_mask=mask).logits[keep],
                               eager(input_ids=ids, attention_mask=mask).logits[keep], atol=3e-5, rtol=1e-4)
    # batch 1, left padded, no position ids: the model derives them, the mask still decides
    torch.testing.assert_close(ours(input_ids=ids[:1], attention_mask=mask[:1]).logits[keep[:1]],
                               eager(input_ids=ids[:1], attention_mask=mask[:1]).logits[keep[:1]],
                               atol=3e-5, rtol=1e-4)


# (batch, left padding of the second row, attention_mask given): with no padding transformers hands
# the attention no mask, and a static cache's unfilled slots must still be left out
GENERATE_LAYOUTS = {"one-row": (1, 0, True), "one-row-no-mask": (1, 0, False), "two-rows": (2, 0, True),
                    "two-rows-no-mask": (2, 0, False), "left-padded": (2, 2, True)}


@pytest.mark.parametrize("kind", list(ARCHITECTURES))
@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("layout", list(GENERATE_LAYOUTS))
def test_greedy_generate_matches_eager(kind, cache, layout):
    batch, padding, with_mask = GENERATE_LAYOUTS[layout]
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(1, VOCAB, (batch, 6), generator=gen)
    mask = torch.ones_like(ids)
    if padding:
        ids[1, :padding], mask[1, :padding] = 0, 0
    options = dict(max_new_tokens=8, do_sample=False, cache_implementation=cache, pad_token_id=0,
                   **(dict(attention_mask=mask) if with_mask else {}))
    expected = _model(kind, "eager").generate(ids, **options)
    assert torch.equal(_model(kind, r1k_hf.NAME).generate(ids, **options), expected)


class _HostReads(TorchDispatchMode):
    """Counts the operations that would make the host wait for a device: reading a value
    (item, bool, nonzero, equal) or copying to the CPU. Values computed on such a copy are host
    values and cost nothing more."""
    READS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.equal.default",
             "aten.is_nonzero.default"}

    def __init__(self):
        super().__init__()
        self.count, self.host = 0, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        on_host = any(id(t) in self.host for t in tensors)
        copies_to_host = str(func) in ("aten._to_copy.default", "aten.copy_.default") and (
            str(kwargs.get("device", "")) == "cpu")
        if (copies_to_host or str(func) in self.READS) and not on_host:
            self.count += 1
        if copies_to_host or on_host:
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.host[id(t)] = t       # keeps it alive: ids stay unique
        return out


@pytest.mark.parametrize("layout", ["position_ids", "collator", "padding"])
def test_one_host_read_per_forward(layout, monkeypatch):
    """Two layers, one forward: the layout is derived (and the offsets checked) once, not per layer.
    With offsets and max lengths given as ints, no read at all. As on a GPU: host checks off (their
    default there) and the Triton backend, whose per-layer launch reads nothing (the torch backend
    loops over sequences in Python)."""
    if "triton" not in cpu_backends("attention"):
        pytest.skip("needs the Triton interpreter")
    monkeypatch.setenv("R1K_CHECKS", "0")
    seqs, _ = _sequences()
    model = _model("llama", r1k_hf.NAME)
    if layout == "padding":
        ids = torch.randint(1, VOCAB, (2, 9))
        kwargs = dict(input_ids=ids, attention_mask=torch.tensor([[0] * 3 + [1] * 6, [1] * 9]).bool())
        allowed = 2     # ours and transformers' own mask.all() check in flash_attention_mask
    elif layout == "collator":
        kwargs = _collated(seqs)
        kwargs["max_length_q"] = kwargs["max_length_k"] = max(LENGTHS)
        allowed = 0
    else:
        packed = r1kernels.pack(seqs)
        kwargs = dict(input_ids=packed.input_ids[None], position_ids=packed.position_ids[None])
        allowed = 1
    reads = _HostReads()
    with r1kernels.use_backend("triton"), torch.no_grad(), reads:
        model(**kwargs)
    assert reads.count <= allowed, f"{reads.count} host reads in one forward, expected at most {allowed}"
