"""``python -m trainer [--config FILE] [--section.field=value ...]``: see ``--help``."""
from __future__ import annotations

import sys

from trainer.config import ConfigError, parse_args


def main(argv=None) -> int:
    try:
        cfg = parse_args(argv)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    from trainer.train import Trainer

    trainer = Trainer(cfg)
    trainer.run()
    distributed = trainer.world.distributed
    trainer.close()
    if distributed:
        from trainer.parallel import exit_rank
        exit_rank(0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
