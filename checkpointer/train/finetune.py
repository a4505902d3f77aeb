"""The fine-tuning loop behind ``recipes/full_finetune_distributed.py`` and ``lora_finetune_distributed.py``.

torchtune provides the models, datasets, loss, optimizer and config instantiation; this
module wires them to FSDP2 (over tensor parallel with ``tensor_parallel_dim``, HSDP with
``data_parallel_replicate_dim``) and the checkpointer: the model is built on the meta device,
parallelized and sharded, and filled by ``DistributedHFCheckpointer.load_model`` (no rank ever holds the
whole model); checkpoints (weights, LoRA adapter, training state) go through
``save_checkpoint``; ``resume_from_checkpoint`` continues from the newest one on any number
of ranks (see ``checkpointer.train.batches`` for why the data order and updates do not depend on
the number of ranks).
"""

from __future__ import annotations

import datetime
import gc
import json
import logging
import os
import sys
import time
from functools import cached_property
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torchtune import config as tune_config
from torchtune.data import padded_collate_sft
from torchtune.modules.peft import get_adapter_params, set_trainable_params

from checkpointer.dcp.training_state import rng_key, rng_state, set_rng_state
from checkpointer.errors import CheckpointArgumentError
from checkpointer.format.dtypes import SHORT_DTYPES
from checkpointer.format.model_config import ModelConfig
from checkpointer.mapping.key_maps import adapter_state_dict
from checkpointer.runtime.distributed import free_port, on_rank_zero, rank, world_size
from checkpointer.train.batches import GlobalBatches, TrainingProgress, clip_gradients, global_sum, scale_gradients
from checkpointer.train.builders import LoraSpec
from checkpointer.train.fsdp import (
    build_sharded_model,
    data_parallel_rank,
    default_mesh,
    initialize_lora,
    parallel_mesh,
    parallelize,
    reset_rope_buffers,
)
from checkpointer.train.lora import merged_state_dict
from checkpointer.train.moe import router_aux_loss
from checkpointer.train.recipe_keys import global_batch_size, lora_alpha, refuse_unsupported

log = logging.getLogger("checkpointer.recipe")
IGNORE_INDEX = -100


def _training_dtype(name: str) -> torch.dtype:
    """``fp32`` or ``bf16`` (``fp16`` would need loss scaling)."""
    if name not in ("fp32", "bf16"):
        raise CheckpointArgumentError(f"dtype {name!r}: training runs in fp32 or bf16", key="dtype")
    return SHORT_DTYPES[name]


def init_distributed(device: torch.device) -> None:
    """A process group for torchrun's ranks, or a one-process group for ``python recipe.py``."""
    if dist.is_initialized():
        return
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))


class FinetuneRecipe:
    """Full or LoRA fine-tuning (``lora=True``) of a Hugging Face model with FSDP2."""

    def __init__(self, cfg: DictConfig, lora: bool = False):
        refuse_unsupported(cfg)
        self.cfg, self.lora = cfg, lora
        self.device = torch.device(cfg.get("device", "cpu"))
        self.dtype = _training_dtype(cfg.get("dtype", "fp32"))
        self.epochs = int(cfg.epochs)
        self.max_steps_per_epoch = cfg.get("max_steps_per_epoch")
        self.save_every_n_steps = cfg.get("save_every_n_steps")
        self.tensor_parallel_dim = int(cfg.get("tensor_parallel_dim", 1))
        self.data_parallel_replicate_dim = int(cfg.get("data_parallel_replicate_dim", 1))
        if self.tensor_parallel_dim > 1 and lora:
            raise CheckpointArgumentError(
                "tensor_parallel_dim > 1 with LoRA is not supported: torch's tensor-parallel styles take nn.Linear only",
                key="tensor_parallel_dim",
            )
        self.log_every_n_steps = int(cfg.get("log_every_n_steps") or 1)
        self.log_peak_memory = bool(cfg.get("log_peak_memory_stats")) and self.device.type == "cuda"
        if cfg.get("log_peak_memory_stats") and not self.log_peak_memory:
            log.warning("log_peak_memory_stats: peak memory is measured on CUDA only (as in torchtune); not logged on %s", self.device)
        self.metric_logger = None

    # ---- setup -------------------------------------------------------------------------------

    def setup(self) -> None:
        init_distributed(self.device)
        self.seed = shared_seed(self.cfg.get("seed"))
        self.progress = TrainingProgress(seed=self.seed)
        torch.manual_seed(self.seed)
        self.mesh = self._build_mesh()
        self.dp_rank, self.dp_size = data_parallel_rank(self.mesh)  # the ranks of one tensor-parallel group share their examples
        resume = {"resume_from_checkpoint": True} if self.cfg.get("resume_from_checkpoint") else {}  # torchtune's top-level key
        self.checkpointer = tune_config.instantiate(self.cfg.checkpointer, **resume)
        self.checkpointer.open()  # collective: the base's config and the resume point, before the model is built
        if self.cfg.get("metric_logger") and rank() == 0:
            self.metric_logger = tune_config.instantiate(self.cfg.metric_logger)
        self.checkpointer.training_info = {"recipe": "lora" if self.lora else "full", "epochs": self.epochs}
        self.model = self._build_model()
        self.checkpointer.load_model(self.model)
        self.tokenizer = self._build_tokenizer()
        self.dataset = tune_config.instantiate(self.cfg.dataset, self.tokenizer)
        self.batches = self._batches()
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = tune_config.instantiate(self.cfg.optimizer, trainable)
        self.lr_scheduler = self._build_lr_scheduler()
        self.loss_fn = tune_config.instantiate(self.cfg.loss)
        if hasattr(self.loss_fn, "num_output_chunks"):
            self.model.set_num_output_chunks(self.loss_fn.num_output_chunks)
        if self.checkpointer.resuming:
            self._restore()

    def _build_mesh(self):
        """torchtune's ``tensor_parallel_dim`` and ``data_parallel_replicate_dim`` (HSDP); 1-D FSDP2 by default."""
        if self.tensor_parallel_dim == 1 and self.data_parallel_replicate_dim == 1:
            return default_mesh(self.device.type)
        return parallel_mesh(
            self.device.type, tensor_parallel_dim=self.tensor_parallel_dim, data_parallel_replicate_dim=self.data_parallel_replicate_dim
        )

    def _tp_plan(self):
        """The config's ``tensor_parallel_plan`` (a ``_component_``, as torchtune's), else the family's (``train.tp_plans``)."""
        return tune_config.instantiate(self.cfg.tensor_parallel_plan) if self.cfg.get("tensor_parallel_plan") else None

    def _batches(self) -> GlobalBatches:
        return GlobalBatches(
            len(self.dataset), global_batch_size(self.cfg, self.dp_size), int(self.cfg.batch_size), self.dp_rank, self.dp_size, self.seed
        )

    def _build_model(self) -> torch.nn.Module:
        model_cfg = self.cfg.get("model") or {}
        checkpointing = bool(self.cfg.get("enable_activation_checkpointing"))
        custom_sharded = list(self.cfg.get("custom_sharded_layers") or [])
        if "_component_" in model_cfg:  # a torchtune builder named in the config
            with torch.device("meta"):
                model = tune_config.instantiate(model_cfg).to(self.dtype)
            model = parallelize(
                model, self.mesh, self._tp_plan(), self.checkpointer.model_type,
                activation_checkpointing=checkpointing, custom_sharded_layers=custom_sharded,
            )  # fmt: skip
            model.to_empty(device=self.device)
            reset_rope_buffers(model, self.device)
            initialize_lora(model)
        else:
            lora_cfg = model_cfg.get("lora") if self.lora else None
            lora = LoraSpec(**{**OmegaConf.to_container(lora_cfg), "lora_attn_modules": tuple(lora_cfg.lora_attn_modules)}) if lora_cfg else None
            config = ModelConfig.from_dict(self.checkpointer.config_dict)
            model = build_sharded_model(
                self.checkpointer.model_type, config, self.mesh, device=self.device, dtype=self.dtype, lora=lora,
                max_seq_len=model_cfg.get("max_seq_len"), tp_plan=self._tp_plan(),
                activation_checkpointing=checkpointing, custom_sharded_layers=custom_sharded,
            )  # fmt: skip
        if self.lora:
            set_trainable_params(model, get_adapter_params(model))
        return model

    @cached_property
    def router_aux_loss_coef(self) -> float:
        """The weight of the router's load-balancing loss (config.json ``router_aux_loss_coef``; 0 for dense models)."""
        return ModelConfig.from_dict(self.checkpointer.config_dict).router_aux_loss_coef

    def _build_tokenizer(self):
        if self.cfg.get("tokenizer") and "_component_" in self.cfg.tokenizer:
            return tune_config.instantiate(self.cfg.tokenizer)
        from checkpointer.train.hf_tokenizer import hf_chat_tokenizer

        return hf_chat_tokenizer(str(self.checkpointer.local_support_dir()), max_seq_len=self.cfg.get("max_seq_len"))

    def _build_lr_scheduler(self):
        if not self.cfg.get("lr_scheduler"):
            return None
        total = self.epochs * min(self.batches.steps_per_epoch, self.max_steps_per_epoch or self.batches.steps_per_epoch)
        return tune_config.instantiate(self.cfg.lr_scheduler, self.optimizer, num_training_steps=total)

    # ---- resume and save ---------------------------------------------------------------------

    def _training_state(self) -> dict[str, Any]:
        state = {
            "optimizer": get_optimizer_state_dict(self.model, self.optimizer),
            "progress": self.progress.state_dict(),
            rng_key(): rng_state(),
        }
        if self.lr_scheduler is not None:
            state["lr_scheduler"] = self.lr_scheduler.state_dict()
        return state

    def _restore(self) -> None:
        state = self.checkpointer.load_training_state(self._training_state())
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"])
        self.progress.load_state_dict(state["progress"])
        if self.progress.seed != self.seed:  # seed: null drew another one: the data order is the checkpoint's
            self.seed = self.progress.seed
            self.batches = self._batches()
        if self.lr_scheduler is not None:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if rng_key() in state:
            set_rng_state(state[rng_key()])
        if rank() == 0:
            log.info("resumed from %s at epoch %d, step %d", self.checkpointer.resume_manifest["name"], self.progress.epoch, self.progress.global_step)

    def save(self, *, epoch: int, step: int | None = None, final: bool = False) -> str:
        intermediate = not final or bool(self.cfg.get("save_final_training_state", False))
        state: dict[str, Any] = {}
        if self.lora:
            state["adapter"] = adapter_state_dict(self.model)
            state["adapter_config"] = {"lora_alpha": lora_alpha(self.cfg)}
            if final and self.cfg.get("save_merged_weights", True) and not self.cfg.get("save_adapter_weights_only"):
                state["model"] = merged_state_dict(self.model)
        else:
            state["model"] = self.model.state_dict()
        if intermediate:
            state.update(self._training_state())
        return self.checkpointer.save_checkpoint(
            state, epoch=epoch, intermediate_checkpoint=intermediate, adapter_only="model" not in state, step=step
        )

    # ---- training ----------------------------------------------------------------------------

    def train(self) -> None:
        while self.progress.epoch < self.epochs:
            limit = self.max_steps_per_epoch or self.batches.steps_per_epoch
            for step, micro_batches in self.batches.epoch(self.progress.epoch, self.progress.step_in_epoch):
                if step >= limit:
                    break
                started = time.perf_counter()
                loss = self._train_step(micro_batches)
                self.progress.step_in_epoch, self.progress.global_step = step + 1, self.progress.global_step + 1
                self._log(loss, time.perf_counter() - started)
                if self.save_every_n_steps and self.progress.global_step % int(self.save_every_n_steps) == 0:
                    self.save(epoch=self.progress.epoch, step=self.progress.global_step)
            self.progress.epoch, self.progress.step_in_epoch = self.progress.epoch + 1, 0
            final = self.progress.epoch == self.epochs
            if final or self.progress.epoch % int(self.cfg.get("save_every_n_epochs", 1)) == 0:
                self.save(epoch=self.progress.epoch - 1, final=final)
        self.checkpointer.wait()  # a background save must be published before the job ends
        if self.metric_logger is not None:
            self.metric_logger.close()

    def _batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        if not indices:  # this rank has no example left in the step: a batch that adds no loss
            pad = self.tokenizer.pad_id
            return {"tokens": torch.tensor([[pad]]), "labels": torch.tensor([[IGNORE_INDEX]])}
        return padded_collate_sft([self.dataset[i] for i in indices], padding_idx=self.tokenizer.pad_id, ignore_idx=IGNORE_INDEX)

    def _micro_step(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward of one micro-batch; returns (summed token loss, loss tokens)."""
        batch = self._batch(indices)
        tokens, labels = batch["tokens"].to(self.device), batch["labels"].to(self.device)
        labels = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)
        count = (labels != IGNORE_INDEX).sum()
        logits = self.model(tokens)
        if count == 0:
            loss = sum(chunk.sum() for chunk in (logits if isinstance(logits, list) else [logits])) * 0.0
        else:
            loss = self.loss_fn(logits, labels) * count
        aux = router_aux_loss(self.model) if self.router_aux_loss_coef else None  # MoE load balancing, weighted as transformers does
        if aux is not None:
            loss = loss + self.router_aux_loss_coef * aux * count
        loss.backward()
        return loss.detach(), count

    def _train_step(self, micro_batches: list[list[int]]) -> float:
        losses, counts = zip(*(self._micro_step(indices) for indices in micro_batches))
        tokens = global_sum(torch.stack(counts).sum().float())
        total = global_sum(torch.stack(losses).sum().float())
        scale_gradients(self.model, world_size() / tokens.item())
        if self.cfg.get("clip_grad_norm") and self.tensor_parallel_dim > 1:
            clip_gradients(self.model, float(self.cfg.clip_grad_norm))
        elif self.cfg.get("clip_grad_norm"):
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), float(self.cfg.clip_grad_norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        return (total / tokens).item()

    def _log(self, loss: float, seconds: float) -> None:
        step = self.progress.global_step
        if rank() != 0 or step % self.log_every_n_steps:
            return
        lr = self.optimizer.param_groups[0]["lr"]
        print(f"epoch {self.progress.epoch} step {step} loss {loss:.6f} lr {lr:.3g} ({seconds:.2f} s)", flush=True)
        if self.metric_logger is not None:
            memory = {"peak_memory_alloc": torch.cuda.max_memory_allocated(self.device) / 2**30} if self.log_peak_memory else {}
            self.metric_logger.log_dict({"loss": loss, "lr": lr, "step_seconds": seconds, **memory}, step=step)
        if self.cfg.get("metrics_file"):
            with open(self.cfg.metrics_file, "a") as f:
                f.write(json.dumps({"step": self.progress.global_step, "epoch": self.progress.epoch, "loss": loss, "lr": lr}) + "\n")

def shared_seed(seed: int | None) -> int:
    """The config's seed; for ``seed: null`` (torchtune: a random one) rank 0 draws it and every rank takes it."""
    if seed is not None:
        return int(seed)
    drawn = on_rank_zero(lambda: int.from_bytes(os.urandom(4), "little"))
    log.info("seed: null: using seed %d", drawn)
    return drawn


def shutdown(succeeded: bool) -> None:
    """Tear the process group down cleanly (gloo can crash at exit otherwise); no barrier after a failure."""
    if dist.is_initialized():
        if succeeded:
            dist.barrier()
        dist.destroy_process_group()


def run(cfg: DictConfig, lora: bool, exit_process: bool = False) -> None:
    """Set up, train, save, tear down.

    With ``exit_process`` (the recipe scripts), a successful run ends the process with
    ``os._exit(0)`` after the clean shutdown: gloo's worker threads can still hold work
    objects whose destruction during interpreter finalization aborts the process
    (pytorch/pytorch#179291), turning a finished run into a failed one.
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    recipe = FinetuneRecipe(cfg, lora=lora)
    succeeded = False
    try:
        recipe.setup()
        recipe.train()
        succeeded = True
    finally:
        del recipe
        gc.collect()  # release FSDP state and pending work while the interpreter is fully alive
        shutdown(succeeded)
    if exit_process:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
