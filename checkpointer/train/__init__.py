"""Fine-tuning: builders from config.json, FSDP2, LoRA, the tokenizer, the recipe loop."""
