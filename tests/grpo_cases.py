"""The policy-loss test cases shared by tests/test_grpo.py and tests/test_grpo_one_pass.py: a padded
batch with the edge cases, every (loss type, IS level, beta, delta, dual clip) combination, and the
options each takes."""
import itertools

import torch

from r1kernels.grpo import LOSS_TYPES

B, T = 6, 9


def loss_batch(dtype=torch.float64, spread=0.6):
    """Padded batch: varied lengths, one fully masked row, mixed-sign and zero advantages,
    ratios far outside the clip range both ways."""
    lengths = torch.tensor([9, 4, 0, 1, 7, 9])
    mask = (torch.arange(T)[None, :] < lengths[:, None])
    logp = -torch.rand(B, T, dtype=dtype) * 3
    old = logp + torch.randn(B, T, dtype=dtype) * spread
    ref = logp + torch.randn(B, T, dtype=dtype) * 0.3
    entropy = torch.rand(B, T, dtype=dtype) * 2
    adv = torch.randn(B, dtype=dtype)
    adv[4] = 0.0
    return dict(logp=logp, old=old, ref=ref, entropy=entropy, adv=adv, mask=mask, lengths=lengths)


def loss_cases():
    for loss_type, entry in LOSS_TYPES.items():
        clipped = entry.clipped
        for level, beta in itertools.product(("token", "sequence"), (0.0, 0.04)):
            for delta, clip_c in ([(None, None), (1.5, None), (None, 3.0), (1.5, 3.0)] if clipped else [(None, None)]):
                yield loss_type, level, beta, delta, clip_c


def loss_options_of(loss_type, level, beta, delta, clip_c):
    opts = dict(loss_type=loss_type, importance_sampling_level=level, beta=beta)
    values = dict(epsilon_low=0.2, epsilon_high=0.28 if LOSS_TYPES[loss_type].clipped else 1.5,
                  delta=delta, clip_ratio_c=clip_c, max_completion_length=12, num_items_in_batch=37.0,
                  sapo_temperature_pos=None, sapo_temperature_neg=None, vespo_k_pos=1.5, vespo_lambda_pos=None,
                  vespo_k_neg=None, vespo_lambda_neg=2.5)
    opts.update({name: values[name] for name in LOSS_TYPES[loss_type].accepts})
    return {k: v for k, v in opts.items() if v is not None}


def reference_options(opts):
    ref = dict(opts)
    ref.setdefault("epsilon_low", 0.2)
    return ref


def to_packed(x, lengths):
    return torch.cat([x[b, :n] for b, n in enumerate(lengths.tolist())])
