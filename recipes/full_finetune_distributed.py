"""Full fine-tuning with FSDP2; weights load and save shard by shard through DistributedHFCheckpointer.

    tune run --nproc_per_node 2 recipes/full_finetune_distributed.py --config configs/demo/smollm2_full.yaml
    python recipes/full_finetune_distributed.py --config configs/tiny/full.yaml checkpointer.checkpoint_dir=...

The loop lives in checkpointer.train.finetune; this file only parses the config.
"""

import sys

from omegaconf import DictConfig
from torchtune import config

from checkpointer.train.finetune import run


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    run(cfg, lora=False, exit_process=True)


if __name__ == "__main__":
    sys.exit(recipe_main())
