"""export --merge: the merged model answers exactly like base + adapter, and loads without peft; a damaged
version, or one whose base folder now holds another model, is refused."""

from __future__ import annotations

import json
import shutil

import pytest

from daemon import versions as publish
from daemon.trainer.export import export_merged
from daemon.trainer.fingerprint import base_fingerprint
from daemon.paths import Layout, UserError


@pytest.fixture
def adapter(root, tiny_model_dir):
    """A published version v1 of adapter "default" with non-zero LoRA weights on the tiny model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    layout = Layout.at(root).ensure()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    # init_lora_weights=False: B is random rather than zero, so the adapter really changes the outputs.
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                            init_lora_weights=False))
    adapter_dir = layout.adapter_dir("default")
    staged = publish.staging_dir(adapter_dir, 1)
    model.save_pretrained(staged)
    publish.publish(adapter_dir, staged, {"adapter": "default", "job_id": 1, "base_model": "tiny",
                                          "base_model_path": str(tiny_model_dir), "lora": {"r": 4}})
    return layout


def logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=ids).logits


def test_merged_model_matches_base_plus_adapter(adapter, root, tiny_model_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = export_merged(adapter, "default", root / "exports" / "merged")
    assert out == root / "exports" / "merged"
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    info = json.loads((out / "export.json").read_text())
    assert info["adapter"] == "default" and info["version"] == 1 and info["base_model_path"] == str(tiny_model_dir)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp folder left

    tok = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([tok("The capital of France is Paris.")["input_ids"]])
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    base_logits = logits(base, ids)
    with_adapter = PeftModel.from_pretrained(base, adapter.adapter_dir("default") / "v1").eval()
    expected = logits(with_adapter, ids)
    got = logits(merged, ids)
    assert (expected - base_logits).abs().max() > 1e-3  # the adapter matters ...
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)  # ... and the merge keeps it


def test_export_refuses_what_it_cannot_do(adapter, root):
    (root / "taken").mkdir()
    (root / "taken" / "x").write_text("keep me")
    with pytest.raises(UserError, match="not an empty folder"):
        export_merged(adapter, "default@1", root / "taken")
    assert (root / "taken" / "x").read_text() == "keep me"
    with pytest.raises(UserError, match="no published version"):
        export_merged(adapter, "default@7", root / "out")
    with pytest.raises(UserError, match="bad version"):
        export_merged(adapter, "default@latest-ish", root / "out")
    meta_path = adapter.adapter_dir("default") / "v1" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "base_model_path": str(root / "gone")}))
    with pytest.raises(UserError, match="not there"):
        export_merged(adapter, "default", root / "out")
    assert not (root / "out").exists()


def test_a_damaged_version_is_refused_in_one_line_and_skipped_when_no_version_is_named(adapter, root, capsys):
    from daemon.trainer.generate import resolve_version

    adapter_dir = adapter.adapter_dir("default")
    shutil.copytree(adapter_dir / "v1", adapter_dir / "v2")
    weights = adapter_dir / "v2" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(UserError, match=r"^version default@2 is damaged and cannot be used: "
                                        r"adapter_model.safetensors has \d+ bytes, \d+ were published$"):
        export_merged(adapter, "default@2", root / "out")
    assert not (root / "out").exists()

    path, meta = resolve_version(adapter.checkpoints, "default")
    assert path == adapter_dir / "v1" and meta["version"] == 1
    assert "Warning: version default@2 is damaged (adapter_model.safetensors has" in capsys.readouterr().err


def test_a_version_is_refused_when_its_base_folder_now_holds_another_model(adapter, root, tiny_model_dir):
    base = shutil.copytree(tiny_model_dir, root / "base")
    meta_path = adapter.adapter_dir("default") / "v1" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "base_model_path": str(base),
                                     "base_model_fingerprint": base_fingerprint(base)}))
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    with pytest.raises(UserError, match=f"default@1 was trained on another model than the one now at {base}"):
        export_merged(adapter, "default@1", root / "out")
