"""Benchmark of sharded Hugging Face checkpoint loading and saving: ``python -m bench.run``.

- ``models``: random Llama-architecture base models in Hugging Face format (written once, reused);
- ``measure``: wall time (barrier to barrier) and per-rank peak RSS growth of one operation;
- ``methods``: the registry of load and save methods (ours, torchtune, torch DCP, floors);
- ``worker``: what each rank of one spawned process group runs;
- ``report``: medians, ratios, targets and ``RESULTS.md``;
- ``run``: the command line.
"""
