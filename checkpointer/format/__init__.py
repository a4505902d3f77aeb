"""On-disk formats: safetensors, Hugging Face files and index, config.json, PEFT, manifest, model card."""
