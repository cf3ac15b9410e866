"""Run :func:`umm_tools.ppo.ppo` from the command line, for the multi-process test.

    accelerate launch --cpu --num_processes 2 tests/ppo_launch.py POLICY PROMPTS OUTPUT_DIR OPTIONS_JSON

OPTIONS_JSON is a JSON object of :class:`umm_tools.ppo.PPOOptions` fields. The gold reward is
:func:`count_good` (how often the word "good" appears in the response).
"""

from __future__ import annotations

import json
import sys


def count_good(prompts: list[str], responses: list[str]) -> list[float]:
    return [float(r.split().count("good")) for r in responses]


def main(argv: list[str]) -> None:
    import torch

    torch.set_num_threads(1)
    from umm_tools.ppo import PPOOptions, ppo

    policy, prompts, output_dir, options = argv
    ppo(policy, prompts, output_dir, PPOOptions(**json.loads(options)), gold_fn=count_good)


if __name__ == "__main__":
    main(sys.argv[1:])
