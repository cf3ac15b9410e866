"""Run :func:`umm_tools.learn_merge.learn_merge` from the command line, for the multi-process test.

    python -m torch.distributed.run --nproc_per_node 2 tests/learn_merge_launch.py MOE DATA OUTPUT OPTIONS_JSON

OPTIONS_JSON is a JSON object of :class:`umm_tools.learn_merge.LearnMergeOptions` fields.
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> None:
    import torch

    torch.set_num_threads(1)
    from umm_tools.learn_merge import LearnMergeOptions, learn_merge

    moe, data, output, options = argv
    learn_merge(moe, data, output, LearnMergeOptions(**json.loads(options)))


if __name__ == "__main__":
    main(sys.argv[1:])
