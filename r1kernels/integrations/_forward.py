"""Running our ops inside a module's forward, so that a sharding engine's hooks cover what they read.

DeepSpeed ZeRO-3 and FSDP2 gather a module's parameters only around that module's forward (and again
for its backward): a weight read anywhere else is a partition, a released buffer or a DTensor shard.
TRL's and verl's fused paths both read ``lm_head.weight`` outside lm_head's forward; the integrations
run their lm_head work through ``call_as_forward`` instead.
"""
from __future__ import annotations


def call_as_forward(wrapper, module, method, *args):
    """``method(*args)`` run as ``module``'s forward, called through ``wrapper`` (the engine's module
    around ``module``, or ``module`` itself): the engine's hooks run around it as around any forward.
    DeepSpeed ZeRO-3 gathers the parameters the module reads and arms their gathering for the
    backward; FSDP2 unshards the module's unit, reshards it after, and unshards it again for the
    backward before reduce-scattering its gradients; DDP prepares its reducer for what it returns.
    ``method`` may call the module's own forward (restored before ``method`` runs)."""
    own = module.__dict__.get("forward")          # an instance attribute (TRL's fused head), or None

    def restore():
        if own is None:
            module.__dict__.pop("forward", None)
        else:
            module.forward = own

    def redirected(*call_args):
        restore()
        return method(*call_args)

    module.forward = redirected
    try:
        return wrapper(*args)
    finally:
        restore()
