"""Run one umm stage from the command line, for the multi-process tests (one thread per process)::

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/stage_launch.py STAGE IN DATA OUT OPTIONS_JSON

STAGE is ``train`` or ``learn-merge``; OPTIONS_JSON is a JSON object of that stage's options fields.
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> None:
    import torch

    torch.set_num_threads(1)
    from umm_tools.pipeline import options_class

    stage, source, data, output, options = argv
    opts = options_class(stage)(**json.loads(options))
    if stage == "train":
        from umm_tools.train import train as run
    elif stage == "learn-merge":
        from umm_tools.learn_merge import learn_merge as run
    else:
        raise SystemExit(f"stage_launch: unsupported stage {stage!r}")
    run(source, data, output, opts)


if __name__ == "__main__":
    main(sys.argv[1:])
