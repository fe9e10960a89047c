"""One GRPO update on fixed rollouts: as one process (no FSDP), or as a rank under torchrun with FSDP2
(each rank holding half of the sequences). Writes the loss and a few updated parameters as JSON."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trainer_helpers import fixed_rollouts, tiny_config  # noqa: E402

from trainer.train import Trainer  # noqa: E402


def main(out_path):
    distributed = "RANK" in os.environ
    cfg = tiny_config(os.path.dirname(out_path), grpo={"loss_type": "dapo", "micro_batch_tokens": 20},
                      parallel={"fsdp": "on" if distributed else "off"})
    trainer = Trainer(cfg)
    prompts, completions, adv = fixed_rollouts(num=12, seed=5)
    rows = list(range(trainer.world.rank, 12, trainer.world.size))
    optimizer, scheduler = trainer._optimizer(1e-2, 10, 0, "constant")
    row = trainer.update([prompts[r] for r in rows], [completions[r] for r in rows], [adv[r] for r in rows],
                         optimizer, scheduler)
    state = {}
    for name, p in trainer.model.named_parameters():
        if name.endswith(("layers.0.self_attn.q_proj.weight", "norm.weight", "embed_tokens.weight")):
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            state[name] = full.detach()[:4].tolist()
    if trainer.world.is_main:
        with open(out_path, "w") as f:
            json.dump({"loss": row["loss"], "params": state, "fsdp": distributed}, f)
    trainer.world.close()


if __name__ == "__main__":
    main(sys.argv[1])
