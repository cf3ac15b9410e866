"""Run :func:`umm_tools.train.train` from the command line, for the multi-process test.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/train_launch.py MODEL DATA OUTPUT_DIR OPTIONS_JSON

OPTIONS_JSON is a JSON object of :class:`umm_tools.train.TrainOptions` fields.
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> None:
    import torch

    torch.set_num_threads(1)
    from umm_tools.train import TrainOptions, train

    model, data, output_dir, options = argv
    train(model, data, output_dir, TrainOptions(**json.loads(options)))


if __name__ == "__main__":
    main(sys.argv[1:])
