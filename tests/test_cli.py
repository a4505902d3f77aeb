"""The ``checkpointer`` command line on local folders, memory:// and the local Hub, against real peers.

Commands run in-process through ``checkpointer.cli.main(argv)`` (and once as ``python -m
checkpointer``); results are checked with safetensors' ``safe_open``, transformers'
``from_pretrained`` logits, PEFT, and the Hub's commit list.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest
import torch
import torch.distributed.checkpoint as dcp
from dist_workers import save_dcp
from places import KINDS, place, unique_repo
from safetensors import safe_open
from safetensors.torch import save_file
from variants import TOKENS, TOLERANCE, assert_same_tensors, hf_logits

from checkpointer import DistributedHFCheckpointer
from checkpointer.cli.main import main
from checkpointer.dcp.training_state import save_training_state
from checkpointer.format.manifest import MANIFEST_FILE
from checkpointer.mapping.key_maps import adapter_state_dict
from checkpointer.testing.multiprocess import run_on_ranks
from checkpointer.testing.tiny_models import write_tiny_model
from checkpointer.train.builders import LoraSpec, build_model_from_dir

REPO_ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.fixture(scope="module")
def base(tiny_llama3) -> Path:
    """A sharded, untied Llama 3 (q/k rows RoPE-permuted between torchtune and HF); read-only."""
    return tiny_llama3


@pytest.fixture(scope="module")
def lora_checkpoint(base, tmp_path_factory) -> Path:
    """An intermediate checkpoint holding only a LoRA adapter and training state, as a LoRA recipe saves it."""
    model = build_model_from_dir("LLAMA3", base, lora=LoraSpec(("q_proj", "k_proj", "v_proj"), True, False, 4, 8.0))
    out = tmp_path_factory.mktemp("lora")
    checkpointer = DistributedHFCheckpointer(base, out, "LLAMA3")
    checkpointer.load_model(model)
    with torch.no_grad():
        torch.manual_seed(0)
        for value in adapter_state_dict(model).values():
            value.normal_(std=0.05)  # B is zero after initialization: make the adapter change the model
    state = {"adapter": adapter_state_dict(model), "adapter_config": {"r": 4, "lora_alpha": 8.0}, "progress": {"step": torch.tensor(3)}}
    return Path(checkpointer.save_checkpoint(state, epoch=0, intermediate_checkpoint=True, adapter_only=True))


def run(capsys, *argv) -> tuple[int, str, str]:
    """Run the command line in-process; its exit code, stdout and stderr."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return code, out, err


def _located(request, kind: str, folder: Path) -> str:
    if kind == "hub":
        request.getfixturevalue("hub_env")
    return place(kind, folder)


def _safetensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


def _copy(folder: Path, target: Path) -> Path:
    """A writable copy (published checkpoints are read-only)."""
    shutil.copytree(folder, target, copy_function=shutil.copyfile)
    return target


# ---- help and usage ------------------------------------------------------------------------------


def test_help_tells_what_is_in_it_whether_it_is_whole_and_how_to_publish(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for words in ("inspect", "verify", "push", "is it whole?", "hf://namespace/repo", "exit codes"):
        assert words in out
    assert main([]) == 2
    assert main(["consolidate", "x"]) == 2  # --to is required
    capsys.readouterr()


# ---- inspect ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_inspect_reports_tensors_split_and_model_type_on_every_location(kind, base, request, capsys):
    location = _located(request, kind, base)
    hub = request.getfixturevalue("hub_env") if kind == "hub" else None
    if hub:
        hub.clear_requests()
    code, out, err = run(capsys, "inspect", location, "--json")
    assert code == 0 and "inspected" in err
    report = json.loads(out)
    reference = {}
    for path in base.glob("*.safetensors"):
        with safe_open(path, "pt") as f:
            reference.update({k: (path.name, f.get_slice(k).get_dtype(), f.get_slice(k).get_shape()) for k in f.keys()})
    tensors = {t["name"]: (t["file"], t["dtype"], t["shape"]) for t in report["weights"]["tensors"]}
    assert tensors == reference
    assert report["weights"]["split"]["files"] == 12 and report["model_types"] == ["LLAMA2", "LLAMA3", "LLAMA3_2"]
    assert report["weights"]["index_metadata"]["total_size"] == report["weights"]["tensor_bytes"]
    assert report["manifest"] is None and report["adapters"] == {} and report["training_state"] is None
    if hub:  # headers only: never a whole weight file
        weights = sum(p.stat().st_size for p in base.glob("*.safetensors"))
        served = hub.bytes_served(".safetensors")
        assert 0 < served < weights / 10, (served, weights)


def test_inspect_and_verify_offline_read_the_hugging_face_cache(base, hub_env, monkeypatch, capsys):
    from huggingface_hub import constants, snapshot_download

    location = place("hub", base)
    snapshot_download(location.removeprefix("hf://"))
    hub_env.clear_requests()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert run(capsys, "inspect", location, "--json")[0] == 0
    assert run(capsys, "verify", location, "--full")[0] == 0
    assert hub_env.requests == []


def test_inspect_shows_adapter_manifest_and_training_state(lora_checkpoint, capsys):
    code, out, _ = run(capsys, "inspect", lora_checkpoint)
    assert code == 0
    assert "adapter (top level): 24 tensors" in out and "r=4" in out and "lora_alpha=8.0" in out
    assert "manifest (checkpointer.json): epoch_0" in out and "world size 1" in out
    assert "training state (training_state/): metadata json" in out and "progress" in out
    assert "model type: no weights here" in out


def test_s3_with_storage_options(base, s3_env, tmp_path, capsys):
    fs = s3_env.filesystem()
    bucket = f"cli-{tmp_path.name[-8:].lower().replace('_', '-')}"
    fs.mkdir(bucket)
    fs.put(str(base), f"{bucket}/base", recursive=True)
    options = ["--storage-options", json.dumps(s3_env.storage_options)]
    code, out, _ = run(capsys, "inspect", f"s3://{bucket}/base", "--json", *options)
    assert code == 0 and json.loads(out)["weights"]["split"]["files"] == 12
    assert run(capsys, "consolidate", f"s3://{bucket}/base", "--to", f"s3://{bucket}/one", "--single-file", *options)[0] == 0
    assert run(capsys, "verify", f"s3://{bucket}/one", "--full", *options)[0] == 0
    assert run(capsys, "diff", f"s3://{bucket}/base", f"s3://{bucket}/one", *options)[:2] == (0, "no differences (atol 0.0)\n")
    code, _, err = run(capsys, "inspect", f"s3://{bucket}/base", "--storage-options", "[1]")
    assert code == 2 and "expected a JSON object" in err


# ---- verify ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_verify_passes_a_whole_checkpoint_on_every_location(kind, lora_checkpoint, base, request, capsys):
    for folder in (base, lora_checkpoint):
        location = _located(request, kind, folder)
        for extra in ([], ["--full"]):
            code, out, err = run(capsys, "verify", location, *extra)
            assert (code, out) == (0, ""), (out, err)
            assert "is whole" in err


def _line_about(text: str, name: str) -> str:
    """The one output line that names ``name``."""
    lines = [line for line in text.splitlines() if name in line]
    assert len(lines) == 1, (name, text)
    return lines[0]


def test_verify_lists_every_problem_with_its_file_and_key(base, tmp_path, capsys):
    broken = _copy(base, tmp_path / "broken")
    (broken / "model-00003-of-00012.safetensors").unlink()
    shard = broken / "model-00005-of-00012.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.9.extra.weight"] = "model-00001-of-00012.safetensors"
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    code, out, err = run(capsys, "verify", broken)
    assert code == 1 and "NOT whole: 3 problem(s)" in err
    problems = out.splitlines()
    assert len(problems) == 3 and all(p.startswith("PROBLEM: ") for p in problems)
    assert "model-00003-of-00012.safetensors: missing" in out
    assert "truncated" in _line_about(out, "model-00005-of-00012.safetensors")
    assert "'model.layers.9.extra.weight' is assigned to model-00001-of-00012.safetensors but that file lacks it" in out


def test_verify_checks_the_manifest_training_state_and_digests(lora_checkpoint, tmp_path, capsys):
    checkpoint = _copy(lora_checkpoint, tmp_path / "ckpt")
    adapter = checkpoint / "adapter_model.safetensors"
    digests = sum(1 for f in json.loads((checkpoint / MANIFEST_FILE).read_text())["files"].values() if f.get("xxh3_128") or f.get("sha256"))
    assert run(capsys, "verify", checkpoint, "--full")[0] == 0
    data = bytearray(adapter.read_bytes())
    data[-1] ^= 0xFF  # a flipped bit in the tensor data: headers and sizes still agree
    adapter.write_bytes(bytes(data))
    code, _, err = run(capsys, "verify", checkpoint)
    assert code == 0 and f"digests of {digests} file(s): checked with --full" in err
    code, out, _ = run(capsys, "verify", checkpoint, "--full")
    assert code == 1 and "adapter_model.safetensors: xxh3_128" in out

    tokenizer = checkpoint / "tokenizer.json"
    tokenizer.write_text(tokenizer.read_text() + " ")
    state = next((checkpoint / "training_state").glob("*.distcp"))
    state.write_bytes(state.read_bytes()[:10])
    code, out, _ = run(capsys, "verify", checkpoint)
    assert code == 1
    assert "tokenizer.json: " in out and "but checkpointer.json records" in out
    assert f"{state.name}: truncated" in out


# ---- consolidate -----------------------------------------------------------------------------------


def test_consolidate_into_one_file_loads_in_transformers_with_the_same_logits(base, tmp_path, capsys):
    code, _, err = run(capsys, "consolidate", base, "--to", tmp_path / "one", "--single-file")
    assert code == 0 and "into 1 file(s)" in err and str(tmp_path / "one") in err
    one = tmp_path / "one"
    assert sorted(p.name for p in one.glob("*.safetensors")) == ["model.safetensors"] and not (one / "model.safetensors.index.json").exists()
    expected, got = _safetensors(base), _safetensors(one)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], v) for k, v in expected.items())
    assert (hf_logits(one) - hf_logits(base)).abs().max() <= TOLERANCE
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json", "config.json"} <= {p.name for p in one.iterdir()}
    code, _, err = run(capsys, "consolidate", base, "--to", one)
    assert code == 2 and "pass --overwrite" in err
    code, _, _ = run(capsys, "consolidate", one, "--to", one, "--max-shard-size", "100KB", "--overwrite")  # in place
    assert code == 0 and len(list(one.glob("*.safetensors"))) == 4 and (hf_logits(one) - hf_logits(base)).abs().max() <= TOLERANCE


def test_consolidate_to_memory_converts_dtype_and_resplits(base, tmp_path, capsys):
    url = f"memory://consolidated/{tmp_path.name}"
    code, _, _ = run(capsys, "consolidate", base, "--to", url, "--dtype", "bf16", "--max-shard-size", "40KB")
    assert code == 0
    local = tmp_path / "fetched"
    fsspec.filesystem("memory").get(url.removeprefix("memory:/"), str(local), recursive=True)
    config = json.loads((local / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    index = json.loads((local / "model.safetensors.index.json").read_text())
    files = list(local.glob("*.safetensors"))
    assert len(set(index["weight_map"].values())) == len(files) > 1 and max(f.stat().st_size for f in files) < 41_000
    expected = _safetensors(base)
    got = _safetensors(local)
    assert all(got[k].dtype == torch.bfloat16 and torch.equal(got[k], v.to(torch.bfloat16)) for k, v in expected.items())
    assert run(capsys, "verify", url, "--full")[0] == 0


def test_consolidate_from_the_hub_to_the_hub_is_one_commit(base, hub_env, capsys):
    from huggingface_hub import snapshot_download

    source, out = place("hub", base), unique_repo("consolidated")
    code, _, err = run(capsys, "consolidate", source, "--to", f"hf://{out}", "--single-file", "--message", "one file")
    assert code == 0 and f"/{out}/commit/" in err
    commits = hub_env.commits(out)
    assert len(commits) == 2 and commits[0]["title"] == "one file"  # the repo's first commit, then ours
    assert "model.safetensors" in commits[0]["files_changed"]
    assert (hf_logits(snapshot_download(out)) - hf_logits(base)).abs().max() <= TOLERANCE


# ---- export ----------------------------------------------------------------------------------------


def _peft_logits(base: Path, adapter: Path) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="eager")
    peft = PeftModel.from_pretrained(model, adapter).eval()
    with torch.no_grad():
        return peft(TOKENS).logits


def test_export_merges_a_lora_checkpoint_like_peft(lora_checkpoint, base, tmp_path, capsys):
    code, _, err = run(capsys, "export", lora_checkpoint, "--to", tmp_path / "merged")
    assert code == 0 and "merged 12 LoRA pair(s)" in err
    merged = hf_logits(tmp_path / "merged")
    assert (merged - _peft_logits(base, lora_checkpoint)).abs().max() <= TOLERANCE
    assert (merged - hf_logits(base)).abs().max() > 1e-3  # the adapter did change the model
    assert run(capsys, "verify", tmp_path / "merged", "--full")[0] == 0


def test_export_from_memory_to_the_hub_in_one_commit(lora_checkpoint, base, hub_env, capsys):
    from huggingface_hub import snapshot_download

    source, out = place("memory", lora_checkpoint), unique_repo("merged")
    code, _, _ = run(capsys, "export", source, "--to", f"hf://{out}", "--base", base, "--public")
    assert code == 0 and len(hub_env.commits(out)) == 2
    downloaded = Path(snapshot_download(out))
    assert "checkpointer" in (downloaded / "README.md").read_text()  # a model card came with it
    assert (hf_logits(downloaded) - _peft_logits(base, lora_checkpoint)).abs().max() <= TOLERANCE


def _torchtune_state(base: Path) -> dict[str, torch.Tensor]:
    model = build_model_from_dir("LLAMA3", base)
    DistributedHFCheckpointer(base, base.parent / "unused", "LLAMA3").load_model(model)
    return model.state_dict()


def test_export_dcp_refuses_pickled_metadata_unless_trusted(base, tmp_path, capsys):
    folder = tmp_path / "dist_epoch_0"
    dcp.save({"model": _torchtune_state(base), "epochs_run": 1}, checkpoint_id=folder, no_dist=True)  # torchtune's layout
    code, _, err = run(capsys, "export", folder, "--to", tmp_path / "hf", "--model-type", "LLAMA3", "--base", base)
    assert code == 2 and "pickle" in err and "--trust-pickle" in err and not (tmp_path / "hf").exists()
    code, _, _ = run(capsys, "export", folder, "--to", tmp_path / "hf", "--model-type", "llama3", "--base", base, "--trust-pickle")
    assert code == 0
    assert (hf_logits(tmp_path / "hf") - hf_logits(base)).abs().max() <= TOLERANCE


def test_export_dcp_saved_on_two_ranks_with_fused_tensors(tmp_path, capsys):
    base = write_tiny_model("PHI3_MINI", tmp_path / "phi3", max_shard_size="30KB")  # q/k/v and w1/w3 fused in HF files
    run_on_ranks(save_dcp, 2, str(base), "PHI3_MINI", str(tmp_path / "dist_epoch_0"), timeout=300)
    code, _, _ = run(capsys, "export", tmp_path / "dist_epoch_0", "--to", tmp_path / "hf", "--model-type", "PHI3_MINI", "--base", base, "--trust-pickle")
    assert code == 0
    assert (hf_logits(tmp_path / "hf") - hf_logits(base)).abs().max() <= TOLERANCE


def test_export_dcp_of_a_moe_model_splits_experts_over_files(tmp_path, capsys):
    """Saved on 3 ranks (8 experts: 3 + 3 + 2), exported into small files that each hold some of a layer's experts."""
    base = write_tiny_model("MIXTRAL", tmp_path / "mixtral", max_shard_size="60KB")
    run_on_ranks(save_dcp, 3, str(base), "MIXTRAL", str(tmp_path / "dist_epoch_0"), timeout=300)
    code, _, _ = run(
        capsys, "export", tmp_path / "dist_epoch_0", "--to", tmp_path / "hf", "--model-type", "MIXTRAL", "--base", base,
        "--trust-pickle", "--max-shard-size", "60KB",
    )  # fmt: skip
    assert code == 0
    weight_map = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())["weight_map"]
    experts = {weight_map[f"model.layers.0.block_sparse_moe.experts.{e}.w1.weight"] for e in range(8)}
    assert len(experts) > 1  # one stacked tensor, written into several files
    assert_same_tensors(base, tmp_path / "hf")


def test_export_dcp_with_json_metadata_needs_no_trust(base, tmp_path, capsys):
    folder = tmp_path / "state"
    save_training_state({"model": _torchtune_state(base)}, folder)
    source = place("memory", folder)  # DCP reads local files: a remote folder is fetched first
    code, _, _ = run(capsys, "export", source, "--to", tmp_path / "hf", "--model-type", "LLAMA3", "--base", base, "--single-file", "--dtype", "bf16")
    assert code == 0
    got = _safetensors(tmp_path / "hf")
    expected = _safetensors(base)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], v.to(torch.bfloat16)) for k, v in expected.items())


# ---- push ------------------------------------------------------------------------------------------


def test_push_is_one_commit_with_a_card_and_a_tag(lora_checkpoint, base, hub_env, capsys):
    from huggingface_hub import HfApi

    repo = unique_repo("pushed")
    code, out, err = run(capsys, "push", lora_checkpoint, f"hf://{repo}", "--tag", "v1", "--public", "--message", "first adapter")
    assert code == 0
    commits = hub_env.commits(repo)
    assert len(commits) == 2 and commits[0]["title"] == "first adapter"
    assert out.strip() == f"{hub_env.endpoint}/{repo}/commit/{commits[0]['id']}" and "pushed" in err
    expected = {p.relative_to(lora_checkpoint).as_posix() for p in lora_checkpoint.rglob("*") if p.is_file()}
    assert set(commits[0]["files_changed"]) == expected | {"README.md"}
    api = HfApi()
    assert "v1" in {t.name for t in api.list_repo_refs(repo).tags} and not api.repo_info(repo).private
    assert b"checkpoint: `epoch_0`" in hub_env.file_bytes(repo, "README.md")

    code, _, _ = run(capsys, "push", base, f"hf://{repo}", "--revision", "dev")
    assert code == 0 and len(hub_env.commits(repo, "dev")) == 3 and len(hub_env.commits(repo)) == 2
    assert "model.safetensors.index.json" in hub_env.commits(repo, "dev")[0]["files_changed"]


def test_push_refuses_what_it_cannot_push(base, tmp_path, hub_env, capsys):
    broken = _copy(base, tmp_path / "broken")
    (broken / "model-00002-of-00012.safetensors").unlink()
    repo = unique_repo("never")
    code, _, err = run(capsys, "push", broken, f"hf://{repo}")
    assert code == 2 and "not whole" in err and "checkpointer verify" in err and "--no-verify" in err
    code, _, err = run(capsys, "push", base, "s3://bucket/x")
    assert code == 2 and "hf://namespace/repo" in err
    code, _, err = run(capsys, "push", "memory://somewhere", f"hf://{repo}")
    assert code == 2 and "consolidate" in err
    code, _, err = run(capsys, "push", base, f"hf://{repo}@main", "--revision", "dev")
    assert code == 2 and "give one of them" in err


# ---- diff ------------------------------------------------------------------------------------------


def test_diff_lists_changed_missing_and_converted_tensors(base, tmp_path, capsys):
    tensors = _safetensors(base)
    changed = _copy(base, tmp_path / "changed")
    for p in changed.glob("model*"):
        p.unlink()
    tensors["model.norm.weight"] = tensors["model.norm.weight"] + 0.5
    del tensors["lm_head.weight"]
    tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"].to(torch.bfloat16)
    save_file(tensors, changed / "model.safetensors")

    assert run(capsys, "diff", base, base)[:2] == (0, "no differences (atol 0.0)\n")
    code, out, err = run(capsys, "diff", base, changed, "--json")
    assert code == 1 and "3 of 21 tensors differ" in err
    found = {d["name"]: d for d in json.loads(out)["differences"]}
    assert found.keys() == {"model.norm.weight", "lm_head.weight", "model.layers.0.mlp.up_proj.weight"}
    assert found["lm_head.weight"]["change"] == "only in A"
    assert found["model.norm.weight"]["change"] == "values" and abs(found["model.norm.weight"]["max_abs"] - 0.5) < 1e-6
    assert found["model.layers.0.mlp.up_proj.weight"]["change"] == "dtype"
    code, out, _ = run(capsys, "diff", base, changed, "--atol", "1")
    assert code == 1 and "model.norm.weight" not in out and "only in A  lm_head.weight" in out


# ---- bad inputs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv,message",
    [
        (["inspect", "{tmp}/missing"], "no such folder"),
        (["verify", "s3:/bucket/x"], "did you mean s3://"),
        (["inspect", "nosuchproto://x/y"], "fsspec knows no protocol"),
        (["inspect", "hf://tester/no-such-repo"], "not found"),
        (["diff", "{base}", "memory://no/such/place"], "no such folder"),
        (["export", "{base}", "--to", "{tmp}/out"], "already holds Hugging Face weights"),
        (["export", "{tmp}", "--to", "{tmp}/out"], "nothing to export"),
        (["consolidate", "{base}", "--to", "{tmp}/out", "--max-shard-size", "lots"], "not a size"),
        (["consolidate", "{base}", "--to", "{tmp}/out", "--dtype", "int3"], "invalid choice"),
        (["consolidate", "{base}", "--to", "{tmp}", "--overwrite"], "the folder exists and checkpointer did not write it"),
        (["consolidate", "{tmp}", "--to", "{tmp}/out"], "no Hugging Face weights here"),
    ],
)
def test_bad_inputs_exit_2_with_what_to_do(argv, message, base, tmp_path, hub_env, capsys):
    (tmp_path / "stray.txt").write_text("x")
    code, out, err = run(capsys, *[a.format(tmp=tmp_path, base=base) for a in argv])
    assert code == 2 and message in err, err
    assert out == ""


def test_a_truncated_shard_is_an_input_error_for_inspect_and_a_failure_for_verify(base, tmp_path, capsys):
    broken = _copy(base, tmp_path / "broken")
    shard = broken / "model-00004-of-00012.safetensors"
    shard.write_bytes(shard.read_bytes()[:-8])
    code, _, err = run(capsys, "inspect", broken)
    assert code == 2 and "truncated" in _line_about(err, "model-00004-of-00012.safetensors") and "checkpointer verify" in err
    assert run(capsys, "verify", broken)[0] == 1
    code, _, err = run(capsys, "consolidate", broken, "--to", tmp_path / "out")
    assert code == 2 and not (tmp_path / "out").exists()


def test_python_dash_m_runs_as_a_real_process(base, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}  # CHECKPOINTER_CACHE: the private cache
    ok = subprocess.run([sys.executable, "-m", "checkpointer", "verify", str(base)], capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0 and "is whole" in ok.stderr, ok.stderr
    bad = subprocess.run([sys.executable, "-m", "checkpointer", "inspect", str(tmp_path / "nope")], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "no such folder" in bad.stderr and "Traceback" not in bad.stderr
