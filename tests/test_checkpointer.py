"""DistributedHFCheckpointer in one process (no process group) against transformers."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from states import differences
from variants import TOKENS, TOLERANCE, VARIANTS, assert_same_tensors, hf_logits

from checkpointer import DistributedHFCheckpointer
from checkpointer.format.hf_files import INDEX_FILE
from checkpointer.format.manifest import MANIFEST_FILE
from checkpointer.storage.output_lock import LOCK_FILE
from checkpointer.train.builders import build_model_from_dir


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS)


@pytest.mark.parametrize("name", VARIANTS)
def test_load_save_round_trip_matches_transformers(name, tiny_models, tmp_path):
    base = tiny_models[name]
    model_type = VARIANTS[name].model_type
    model = build_model_from_dir(model_type, base)
    checkpointer = DistributedHFCheckpointer(base, tmp_path, model_type)
    checkpointer.load_model(model)
    read = checkpointer.last_load
    reference = hf_logits(base)
    assert (_logits(model) - reference).abs().max() <= TOLERANCE

    full = checkpointer.load_checkpoint()["model"]
    assert full.keys() == model.state_dict().keys()
    assert all(torch.equal(full[k], v) for k, v in model.state_dict().items())

    saved = checkpointer.save_checkpoint({"model": model.state_dict()}, epoch=3)
    assert saved == str(tmp_path / "epoch_3")
    assert (hf_logits(saved) - reference).abs().max() <= TOLERANCE
    _assert_same_split_as_base(base, tmp_path / "epoch_3")
    assert_same_tensors(base, saved)
    assert checkpointer.last_save.bytes == read.bytes  # each byte read once, written once

    again = build_model_from_dir(model_type, saved)
    DistributedHFCheckpointer(saved, tmp_path, model_type).load_model(again)
    assert not differences(model.state_dict(), again.state_dict())


@pytest.mark.parametrize("threads", [2, 3, 7])
def test_a_load_on_several_threads_fills_every_tensor_as_one_thread_does(threads, tiny_models, tmp_path):
    base, model_type = tiny_models["llama2"], VARIANTS["llama2"].model_type  # RoPE q/k rows read as scattered pieces
    loaded = {}
    for n in (1, threads):
        model = build_model_from_dir(model_type, base)
        with torch.no_grad():
            for value in model.state_dict().values():
                value.fill_(float("nan"))  # a tensor left unread stays NaN
        checkpointer = DistributedHFCheckpointer(base, tmp_path, model_type)
        with _torch_threads(n):
            checkpointer.load_model(model)
        loaded[n] = (model.state_dict(), checkpointer.last_load.bytes)
    assert not differences(loaded[1][0], loaded[threads][0]) and loaded[1][1] == loaded[threads][1]
    assert not any(v.isnan().any() for v in loaded[threads][0].values())


@pytest.mark.parametrize("threads", [2, 3])
def test_a_save_on_several_threads_writes_the_bytes_and_digests_one_thread_writes(threads, tiny_models, tmp_path):
    base, model_type = tiny_models["llama2"], VARIANTS["llama2"].model_type
    model = build_model_from_dir(model_type, base)
    DistributedHFCheckpointer(base, tmp_path / "x", model_type).load_model(model)
    saved = {}
    for n in (1, threads):
        checkpointer = DistributedHFCheckpointer(base, tmp_path / f"t{n}", model_type)
        with _torch_threads(n):
            saved[n] = Path(checkpointer.save_checkpoint({"model": model.state_dict()}, epoch=0)), checkpointer.last_save.bytes
    (one, one_bytes), (many, many_bytes) = saved[1], saved[threads]
    files = sorted(p.name for p in one.glob("*.safetensors"))
    assert files and files == sorted(p.name for p in many.glob("*.safetensors")) and one_bytes == many_bytes
    assert all((one / f).read_bytes() == (many / f).read_bytes() for f in files)
    assert _digests(one) == _digests(many)
    DistributedHFCheckpointer(many, tmp_path / "x", model_type, verify_checksums=True).load_checkpoint()


@contextmanager
def _torch_threads(n: int):
    """torch's intra-op threads set to ``n`` inside the block."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _digests(folder: Path) -> dict:
    """The manifest's sizes and range digests of every file (what a save's threads could get wrong)."""
    return json.loads((folder / MANIFEST_FILE).read_text())["files"]


def _assert_same_split_as_base(base, saved) -> None:
    if (base / INDEX_FILE).exists():
        assert json.loads((saved / INDEX_FILE).read_text())["weight_map"] == json.loads((base / INDEX_FILE).read_text())["weight_map"]
    else:
        assert not (saved / INDEX_FILE).exists() and (saved / "model.safetensors").exists()
    for file in saved.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            assert f.metadata() == {"format": "pt"}
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (saved / name).exists(), name


def _mapped_files(tensor: torch.Tensor) -> set[Path]:
    """The files whose memory maps (in /proc/self/maps) hold ``tensor``'s first byte."""
    address, found = tensor.data_ptr(), set()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)  # address range, perms, offset, device, inode[, path]
        path = fields[5] if len(fields) == 6 else ""
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if start <= address < end and path.startswith("/"):
            found.add(Path(path).resolve())
    return found


@pytest.mark.parametrize("name", VARIANTS)
def test_load_checkpoint_maps_the_tensors_stored_as_they_are_and_never_writes_the_files(name, tiny_models, tmp_path):
    base, model_type = tiny_models[name], VARIANTS[name].model_type
    files = {path.resolve(): path.read_bytes() for path in base.glob("*.safetensors")}
    full = DistributedHFCheckpointer(base, tmp_path, model_type).load_checkpoint()["model"]
    stored_as_is = {k for k, v in full.items() if any(v.contiguous().view(-1).view(torch.uint8).numpy().tobytes() in blob for blob in files.values())}
    mapped = {k for k, v in full.items() if _mapped_files(v) & files.keys()}
    assert mapped == stored_as_is and mapped  # RoPE-permuted rows and stacked experts are read into memory of their own
    before = {k: full[k].clone() for k in mapped}
    for k in mapped:
        full[k].add_(1)  # copy-on-write: this process's copy changes, the files never do
    assert {path: path.read_bytes() for path in files} == files
    again = DistributedHFCheckpointer(base, tmp_path, model_type).load_checkpoint()["model"]
    assert all(torch.equal(again[k], before[k]) and not torch.equal(full[k], before[k]) for k in mapped)


def test_torchtune_style_state_dict_and_yaml_component(tiny_models, tmp_path):
    """load_checkpoint is a drop-in for FullModelHFCheckpointer: torchtune keys, full tensors."""
    from omegaconf import OmegaConf
    from torchtune import config as tune_config

    base = tiny_models["llama3"]
    cfg = OmegaConf.create(
        {"_component_": "checkpointer.DistributedHFCheckpointer", "checkpoint_dir": str(base),
         "output_dir": str(tmp_path), "model_type": "LLAMA3", "checkpoint_files": None}
    )  # fmt: skip
    checkpointer = tune_config.instantiate(cfg)
    state = checkpointer.load_checkpoint()["model"]
    model = build_model_from_dir("LLAMA3", base)
    model.load_state_dict(state, strict=True)
    assert (_logits(model) - hf_logits(base)).abs().max() <= TOLERANCE


def test_save_dtype_converts_and_config_says_so(tiny_models, tmp_path):
    base = tiny_models["qwen2_tied"]
    model = build_model_from_dir("QWEN2", base)
    checkpointer = DistributedHFCheckpointer(base, tmp_path, "QWEN2", save_dtype="bf16")
    checkpointer.load_model(model)
    saved = checkpointer.save_checkpoint({"model": model.state_dict()}, epoch=0, step=7)
    assert saved.endswith("step_7")
    config = json.loads((tmp_path / "step_7" / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["tie_word_embeddings"] is True
    with safe_open(tmp_path / "step_7" / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
        assert torch.equal(f.get_tensor("model.embed_tokens.weight"), model.tok_embeddings.weight.to(torch.bfloat16))


def test_loading_into_bf16_model_converts_on_the_fly(tiny_models, tmp_path):
    base = tiny_models["mistral"]
    model = build_model_from_dir("MISTRAL", base).to(torch.bfloat16)
    DistributedHFCheckpointer(base, tmp_path, "MISTRAL").load_model(model)
    full = DistributedHFCheckpointer(base, tmp_path, "MISTRAL").load_checkpoint()["model"]
    assert all(torch.equal(v, full[k].to(torch.bfloat16)) for k, v in model.state_dict().items())


def _saved_once(tiny_models, tmp_path) -> tuple[torch.nn.Module, DistributedHFCheckpointer]:
    """A tiny Llama 2 loaded by a checkpointer that has saved it once, as ``epoch_0``."""
    base = tiny_models["llama2"]
    model = build_model_from_dir("LLAMA2", base)
    checkpointer = DistributedHFCheckpointer(base, tmp_path, "LLAMA2")
    checkpointer.load_model(model)
    checkpointer.save_checkpoint({"model": model.state_dict()}, epoch=0)
    return model, checkpointer


def test_saving_again_replaces_the_old_checkpoint_whole(tiny_models, tmp_path):
    model, checkpointer = _saved_once(tiny_models, tmp_path)
    with torch.no_grad():
        model.norm.scale.fill_(3.0)
    checkpointer.save_checkpoint({"model": model.state_dict()}, epoch=0)
    with safe_open(tmp_path / "epoch_0" / "model.safetensors", "pt") as f:
        assert torch.all(f.get_tensor("model.norm.weight") == 3.0)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != LOCK_FILE) == ["epoch_0"]  # no staging or replaced folders


def test_a_later_save_of_other_dtypes_lays_out_its_own_files(tiny_models, tmp_path):
    """A checkpointer reuses its last save's file layout only for the same keys, dtypes and shapes."""
    model, checkpointer = _saved_once(tiny_models, tmp_path)
    norms = {torch.float32: model.norm.scale.detach().clone()}
    model.to(torch.bfloat16)
    norms[torch.bfloat16] = model.norm.scale.detach().clone()
    checkpointer.save_checkpoint({"model": model.state_dict()}, epoch=1)
    for epoch, (dtype, norm) in enumerate(norms.items()):
        assert json.loads((tmp_path / f"epoch_{epoch}" / "config.json").read_text())["dtype"] == str(dtype).removeprefix("torch.")
        with safe_open(tmp_path / f"epoch_{epoch}" / "model.safetensors", "pt") as f:
            assert torch.equal(f.get_tensor("model.norm.weight"), norm)


@pytest.mark.parametrize("loaded_before", [False, True], ids=["first load", "later load"])
def test_a_model_on_the_meta_device_is_refused_naming_a_key(tiny_models, tmp_path, loaded_before):
    """A later load checks its destinations in the read itself; a first one before opening the base."""
    from checkpointer import CheckpointArgumentError

    base = tiny_models["llama2"]
    checkpointer = DistributedHFCheckpointer(base, tmp_path, "LLAMA2")
    if loaded_before:
        checkpointer.load_model(build_model_from_dir("LLAMA2", base))
    with torch.device("meta"):
        model = build_model_from_dir("LLAMA2", base)
    with pytest.raises(CheckpointArgumentError, match=r"model tensors are on the meta device \(e.g. tok_embeddings.weight\)"):
        checkpointer.load_model(model)


def test_a_later_load_that_asks_for_hashes_verifies_them(tiny_models, tmp_path):
    """The base is checked against its manifest once per job, but hashes asked for later are still verified."""
    from checkpointer import CheckpointFormatError

    model, _ = _saved_once(tiny_models, tmp_path / "first")
    saved = tmp_path / "first" / "epoch_0"
    checkpointer = DistributedHFCheckpointer(saved, tmp_path / "second", "LLAMA2")
    checkpointer.load_model(model)
    with open(saved / "model.safetensors", "r+b") as f:  # one byte of the weights, the size unchanged
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 0xFF]))
    checkpointer.load_model(model)  # sizes were checked once; hashes were not asked for
    checkpointer.verify_checksums = True
    with pytest.raises(CheckpointFormatError, match=r"model.safetensors: xxh3.*the file is corrupt or was replaced"):
        checkpointer.load_model(model)


def test_non_tensor_values_are_refused_before_anything_is_written(tiny_models, tmp_path):
    from checkpointer import CheckpointError

    base = tiny_models["llama2"]
    model = build_model_from_dir("LLAMA2", base)
    state = dict(model.state_dict(), **{"norm.scale": [1.0, 2.0]})
    with pytest.raises(CheckpointError, match=r"'norm.scale'\] is a list, not a tensor"):
        DistributedHFCheckpointer(base, tmp_path, "LLAMA2").save_checkpoint({"model": state}, epoch=0)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("layers,problem", [(1, "unexpected key: model.layers.1."), (3, "missing key: layers.2.")])
def test_missing_and_unexpected_keys_are_listed(tiny_models, tmp_path, layers, problem):
    from checkpointer import CheckpointMismatchError, ModelConfig
    from checkpointer.train.builders import build_model

    base = tiny_models["llama3"]
    config = json.loads((base / "config.json").read_text())
    model = build_model("LLAMA3", ModelConfig.from_dict(config | {"num_hidden_layers": layers}))
    with pytest.raises(CheckpointMismatchError, match=problem) as info:
        DistributedHFCheckpointer(base, tmp_path, "LLAMA3").load_model(model)
    assert "problem(s)" in str(info.value)


# ---- helpers the command line builds on ------------------------------------------------------


@pytest.mark.parametrize("name", VARIANTS)
def test_model_type_is_recognised_from_the_keys_alone(name, tiny_models):
    from checkpointer.format.folder import LocalFolder
    from checkpointer.format.hf_files import read_checkpoint_files
    from checkpointer.mapping.key_maps import model_types_for_keys

    base = tiny_models[name]
    keys = read_checkpoint_files(LocalFolder(base)).tensors
    config = json.loads((base / "config.json").read_text())
    found = model_types_for_keys(keys, config.get("tie_word_embeddings"), config["model_type"])
    model_type = VARIANTS[name].model_type
    assert model_type in found and model_type in model_types_for_keys(keys)
    assert len(found) == 1 or set(found) == {"LLAMA2", "LLAMA3", "LLAMA3_2"}  # one key layout serves all Llamas
    assert not model_types_for_keys(["model.layers.0.self_attn.q_proj.weight"])  # a subset is not a model
    assert not model_types_for_keys([*keys, "model.layers.0.something_else.weight"])


def test_lora_merge_helpers_follow_peft():
    from checkpointer.errors import CheckpointError
    from checkpointer.format.peft import lora_scale, merge_lora, peft_pairs

    assert lora_scale({"r": 4, "lora_alpha": 8}, "x") == 2.0
    assert lora_scale({"r": 4, "lora_alpha": 8, "use_rslora": True}, "x") == 4.0
    for bad in ({"r": 4, "lora_alpha": 8, "use_dora": True}, {"peft_type": "IA3"}, {"r": "x"}):
        with pytest.raises(CheckpointError):
            lora_scale(bad, "x")
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    assert peft_pairs([f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight"], "x") == {
        "model.layers.0.self_attn.q_proj.weight": (f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight")
    }
    with pytest.raises(CheckpointError, match="only one of"):
        peft_pairs([f"{prefix}.lora_A.weight"], "x")
    w, a, b = torch.randn(6, 5, dtype=torch.bfloat16), torch.randn(2, 5), torch.randn(6, 2)
    merged = merge_lora(w, a, b, 0.5)
    assert merged.dtype == torch.bfloat16 and torch.equal(merged, (w.float() + 0.5 * b @ a).to(torch.bfloat16))


def test_manifest_records_sizes_and_sha256_also_of_older_manifests():
    from checkpointer.format.manifest import FileRecord, recorded_files

    assert recorded_files({"files": {"a": 3, "b": {"size": 4, "sha256": "ab"}, "c": {"size": 5, "sha256": None}}}) == {
        "a": FileRecord(3),
        "b": FileRecord(4, "ab"),
        "c": FileRecord(5),
    }


def test_progress_bars_can_be_forced_off_and_on(monkeypatch):
    from checkpointer.runtime.progress import progress_bars, show_progress

    monkeypatch.setenv("CHECKPOINTER_PROGRESS", "1")
    assert show_progress()
    with progress_bars(False):
        assert not show_progress()
        with progress_bars(True):
            assert show_progress()
    assert show_progress()
