"""Key maps: torchtune <-> Hugging Face names and rows, matching, local shards as boxes."""
