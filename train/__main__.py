"""Entry point: parse the config, join the process group, train, leave the group.

    python -m train --help
    torchrun --standalone --nproc-per-node 2 -m train model=resnet18 image_size=32 steps=50
"""

import sys

from .config import ConfigError, main_parse


def main(argv: list[str]) -> int:
    sys.stdout.reconfigure(line_buffering=True)  # the node agent prefixes and forwards lines live
    cfg = main_parse(argv)  # exits 2 with one line on a bad key or value
    from .input_process import training_below_input
    training_below_input(cfg)  # before torch makes this process's CUDA context
    from . import dist, loop  # torch is imported only once the config is known to be good

    try:
        with dist.distributed(cfg.init_timeout_s) as env:
            loop.train(cfg, env)
    except ConfigError as e:  # a mistake only visible once built (model name, data folder, checkpoint)
        print(f"train: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
