"""LoRA fine-tuning with FSDP2: the base loads shard by shard; the adapter saves in PEFT format.

    tune run --nproc_per_node 2 recipes/lora_finetune_distributed.py --config configs/demo/smollm2_lora.yaml
    python recipes/lora_finetune_distributed.py --config configs/tiny/lora.yaml checkpointer.checkpoint_dir=...

The loop lives in checkpointer.train.finetune; this file only parses the config.
"""

import sys

from omegaconf import DictConfig
from torchtune import config

from checkpointer.train.finetune import run


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    run(cfg, lora=True, exit_process=True)


if __name__ == "__main__":
    sys.exit(recipe_main())
