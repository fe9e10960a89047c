"""Values shared by the Python, Triton and C++ code: each is defined here once. The C++ headers
(``csrc/include/r1k/``) restate them, and ``tests/test_constants.py`` checks that they agree."""

IGNORE_INDEX = -100          # a target id that marks a masked token (PyTorch's cross_entropy convention)

# How group advantages are divided after centring: the codes the kernels take (enum GroupScale in
# csrc/include/r1k/group_stats.h).
SCALE_NONE, SCALE_GROUP, SCALE_BATCH = 0, 1, 2
SCALE_CODES = {"none": SCALE_NONE, "group": SCALE_GROUP, "batch": SCALE_BATCH}
