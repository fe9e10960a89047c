"""Values shared by the Python, Triton and C++ code: each is defined here once. The C++ headers
(``csrc/include/r1k/``) restate them, and ``tests/test_constants.py`` checks that they agree."""

IGNORE_INDEX = -100          # a target id that marks a masked token (PyTorch's cross_entropy convention)

# How group advantages are divided after centring: the codes the kernels take (enum GroupScale in
# csrc/include/r1k/group_stats.h).
SCALE_NONE, SCALE_GROUP, SCALE_BATCH = 0, 1, 2
SCALE_CODES = {"none": SCALE_NONE, "group": SCALE_GROUP, "batch": SCALE_BATCH}

# Group advantages of huge rewards: a group whose half range (max - min) / 2 exceeds GROUP_RESCALE_ABOVE
# is normalised on its rewards times GROUP_RESCALE (a power of two: exact), so that its squared
# deviations cannot overflow, even for fp32 rewards at the fp32 maximum; every other group is computed
# unscaled, bit for bit. The kernels take the batch denominator (scale "batch") times GROUP_RESCALE, for
# the same reason (a batch std above the fp32 maximum). kGroupRescaleAbove, kGroupRescale in group_stats.h.
GROUP_RESCALE_ABOVE = 2.0 ** 40
GROUP_RESCALE = 2.0 ** -90
