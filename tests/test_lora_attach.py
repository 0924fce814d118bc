"""The LoRA attached while a job waits for the GPU (early_load.Preload, lora_attach.py) trains exactly what the
usual load would: a fresh adapter, a parent version continued, and a parent of another LoRA config (then the
early LoRA is dropped and the parent's is built)."""

from __future__ import annotations

import torch

from daemon.trainer.early_load import Preload
from daemon.trainer.model import load_for_training
from test_model import cfg, lora_state


def early(base_dir, config, **kw):
    preload, why_not = Preload.start(base_dir, config, torch.device("cpu"))
    assert preload is not None, why_not
    return load_for_training(base_dir, config, "cpu", preload=preload, **kw)


def saved_parent(base_dir, folder):
    """A trained-looking parent version (LoRA B not zero) saved to `folder`."""
    parent, _, _ = load_for_training(base_dir, cfg(), "cpu")
    with torch.no_grad():
        for n, p in parent.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    parent.save_pretrained(folder)
    return parent


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_a_fresh_lora_attached_early_is_the_one_the_usual_load_attaches(tiny_model_dir):
    usual, _, plan = load_for_training(tiny_model_dir, cfg(), "cpu")
    model, _, early_plan = early(tiny_model_dir, cfg())
    assert plan["lora_attached"] == "at load" and early_plan["lora_attached"] == "while waiting for the GPU"
    assert same(lora_state(usual), lora_state(model))  # the seed makes the same A matrices
    assert {k: v for k, v in plan.items() if k != "lora_attached"} == \
        {k: v for k, v in early_plan.items() if k != "lora_attached"}
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_a_parent_continued_on_the_early_lora_loads_its_weights(tiny_model_dir, tmp_path):
    parent = saved_parent(tiny_model_dir, tmp_path / "v1")
    usual, _, _ = load_for_training(tiny_model_dir, cfg(seed=9), "cpu", adapter_dir=tmp_path / "v1")
    model, _, plan = early(tiny_model_dir, cfg(seed=9), adapter_dir=tmp_path / "v1")
    assert plan["lora_attached"] == "while waiting for the GPU"
    assert same(lora_state(usual), lora_state(model)) and same(lora_state(parent), lora_state(model))
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    assert torch.equal(usual(input_ids=ids).logits, model(input_ids=ids).logits)


def test_a_parent_of_another_lora_config_is_built_as_usual(tiny_model_dir, tmp_path):
    parent, _, _ = load_for_training(tiny_model_dir, cfg(r=8, alpha=16), "cpu")
    parent.save_pretrained(tmp_path / "v1")
    usual, _, _ = load_for_training(tiny_model_dir, cfg(), "cpu", adapter_dir=tmp_path / "v1")
    model, _, plan = early(tiny_model_dir, cfg(), adapter_dir=tmp_path / "v1")
    assert plan["lora_attached"] == "at load (the parent version's LoRA config differs from this job's)"
    assert same(lora_state(usual), lora_state(model)) and same(lora_state(parent), lora_state(model))
    assert model.peft_config["default"].r == 8


def test_a_parent_whose_tensors_are_not_the_adapters_one_for_one_is_loaded_by_peft(tiny_model_dir, tmp_path):
    """The direct copy is only for a saved LoRA whose tensors are exactly the attached adapter's; any other goes
    through PEFT's own load, as it would without the early LoRA (which warns of a stray tensor, no more)."""
    from safetensors.torch import load_file, save_file

    parent = saved_parent(tiny_model_dir, tmp_path / "v1")
    path = tmp_path / "v1" / "adapter_model.safetensors"
    weights = load_file(path)
    weights["base_model.model.extra_buffer"] = torch.zeros(1)  # a name the adapter has no tensor for
    save_file(weights, path)
    usual, _, _ = load_for_training(tiny_model_dir, cfg(), "cpu", adapter_dir=tmp_path / "v1")
    model, _, plan = early(tiny_model_dir, cfg(), adapter_dir=tmp_path / "v1")
    assert plan["lora_attached"] == "at load (the parent version's tensors are not this adapter's one for one)"
    assert same(lora_state(usual), lora_state(model)) and same(lora_state(parent), lora_state(model))


def bf16(config):
    config.training.precision = "bf16"
    return config


def test_in_bf16_the_early_path_casts_the_base_as_the_usual_one_does(tiny_model_dir, tmp_path):
    """The usual load casts the whole base to the plan's dtype, float buffers too (RoPE's inv_freq): the model
    built while waiting must be the same, buffers and logits alike."""
    usual, _, _ = load_for_training(tiny_model_dir, bf16(cfg()), "cpu")
    model, _, plan = early(tiny_model_dir, bf16(cfg()))
    assert plan["lora_attached"] == "while waiting for the GPU"
    buffers = dict(usual.named_buffers())
    assert {n: b.dtype for n, b in model.named_buffers()} == {n: b.dtype for n, b in buffers.items()}
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    assert same(lora_state(usual), lora_state(model))
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    assert torch.equal(usual(input_ids=ids).logits, model(input_ids=ids).logits)


def test_a_base_built_for_another_dtype_is_dropped_and_the_plan_says_why(tiny_model_dir):
    preload, _ = Preload.start(tiny_model_dir, cfg(), torch.device("cpu"))  # fp32, as precision auto on a CPU
    model, _, plan = load_for_training(tiny_model_dir, bf16(cfg()), "cpu", preload=preload)
    assert plan["lora_attached"] == ("at load (the base built while waiting was dropped: built in torch.float32, "
                                     "the plan wants torch.bfloat16)")
    assert next(p for p in model.parameters() if not p.requires_grad).dtype == torch.bfloat16
    assert preload.note().endswith("not used: built in torch.float32, the plan wants torch.bfloat16")


def test_where_bitsandbytes_is_installed_nothing_imports_it_before_the_go(tiny_model_dir, tmp_path):
    """bitsandbytes makes a CUDA context on every visible GPU when it is imported, and peft imports it: a waiting
    trainer on such a host imports neither (its standby imports, the base built while waiting), and attaches the
    LoRA after the go. A stand-in bitsandbytes package records any import of it."""
    import subprocess
    import sys
    from pathlib import Path

    stub = tmp_path / "stub" / "bitsandbytes"
    stub.mkdir(parents=True)
    marker = tmp_path / "imported"
    (stub / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\nraise ImportError('stand-in')\n")
    code = f"""
import sys, torch
from pathlib import Path
from daemon.trainer.process import import_training_stack
from daemon.trainer.early_load import Preload
from test_model import cfg
assert import_training_stack() is None
assert "matplotlib.figure" in sys.modules  # the loss plot's stack too: after the last step it would hold the GPU
preload, why_not = Preload.start(Path({str(tiny_model_dir)!r}), cfg(), torch.device("cpu"))
assert preload is not None, why_not
model = preload.take()
assert type(model).__name__ == "LlamaForCausalLM", type(model)
assert "peft" not in sys.modules and "bitsandbytes" not in sys.modules
print(preload.note())
"""
    root = Path(__file__).resolve().parent.parent
    env = {**__import__("os").environ,
           "PYTHONPATH": f"{tmp_path / 'stub'}:{root}:{root / 'tests'}"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "its LoRA after the go: bitsandbytes is installed" in done.stdout
    assert not marker.exists()


def test_weights_the_preload_cannot_size_are_loaded_after_the_go_with_the_reason(tmp_path):
    """The host-memory bound reads every tensor's shape from the safetensors headers: a file without one (a Git
    LFS pointer), or a header of another shape, is a reason not to preload, never a crash; with an index, only
    the files it names count (a consolidated copy beside the shards is not loaded)."""
    import json
    import struct

    from daemon.trainer.early_load import loaded_files, why_not_preload

    def write(path, header):
        data = json.dumps(header).encode()
        path.write_bytes(struct.pack("<Q", len(data)) + data)

    cpu, fp32 = torch.device("cpu"), torch.float32
    (tmp_path / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\n")
    assert why_not_preload(tmp_path, cfg(), 10**12, cpu, fp32).startswith("the weights' headers are unreadable")
    write(tmp_path / "model.safetensors", [1, 2])
    assert why_not_preload(tmp_path, cfg(), 10**12, cpu, fp32).startswith("the weights' headers are unreadable")
    write(tmp_path / "model.safetensors", {"w": {"dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 4]}})
    assert why_not_preload(tmp_path, cfg(), 10**12, cpu, fp32) is None
    assert "would take more than 1/8" in why_not_preload(tmp_path, cfg(), 8 * 4 * 10**6 - 1, cpu, fp32)
    for shard in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        write(tmp_path / shard, {"v": {"dtype": "F32", "shape": [10], "data_offsets": [0, 40]}})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    assert [p.name for p in loaded_files(tmp_path)] == ["model-00001-of-00002.safetensors",
                                                        "model-00002-of-00002.safetensors"]
    assert why_not_preload(tmp_path, cfg(), 8 * 4 * 20, cpu, fp32) is None  # 20 parameters: the shards only
    on_card = why_not_preload(tmp_path, cfg(), 10**12, torch.device("cuda"), fp32, card_total=100)
    assert "more than half of the GPU" in on_card
