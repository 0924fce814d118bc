"""training.compile: the compiled decoder layers (Inductor, here on CPU) over fixed-shape packed micro-batches
train the same function as the eager path, and a compiled run resumes bit for bit (daemon/trainer/compiled.py)."""

from __future__ import annotations

import pytest
import torch

from daemon.trainer import checkpoint, compiled, loss, packing
from daemon.trainer import model as dm
from test_recipe import Tok, config, examples, model, run


def _grads(pm, batch):
    pm.zero_grad(set_to_none=True)
    value = loss.token_loss_sum(pm, batch)
    value.backward()
    return value.detach(), {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}


def test_fixed_shape_padding_keeps_documents_apart_and_the_loss_unchanged():
    ex = examples()
    counts = [len(e.input_ids) for e in ex]
    plans = [packing.plan_micro_batches(counts, token_budget=128, max_examples=2, packing=True, seed=0, epoch=e)
             for e in range(2)]
    shape = compiled.fixed_shape(counts, plans, token_budget=128, max_length=64)
    assert shape["tokens"] == 128 and shape["max_doc"] == 64 and shape["docs"] % compiled.DOC_BUCKET == 0
    cfg = config()
    cfg.lora.dropout = 0.0
    pm, _, plan = dm.prepare_model(model(), Tok(), cfg, "cpu")
    assert plan["compile"] is False and "CPU" in plan["compile_reason"]  # auto: eager on CPU
    for mb in plans[0][:3] + plans[1][:3]:
        batch = packing.collate([ex[i] for i in mb], packing=True, pad_id=0)
        fixed = packing.pad_fixed(batch, **shape)
        assert fixed["input_ids"].shape == (1, shape["tokens"])
        assert fixed["cu_seq_lens"].shape == (shape["docs"] + 1,)
        assert fixed["cu_seq_lens"][-1] == shape["tokens"] and fixed["max_seq_len"] == 64
        assert (fixed["labels"][0, batch["input_ids"].shape[1]:] == packing.IGNORE).all()
        sizes = fixed["cu_seq_lens"].diff()
        assert (sizes >= 0).all() and (sizes <= 64).all()
        a, ga = _grads(pm, batch)
        b, gb = _grads(pm, fixed)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        for name in ga:
            torch.testing.assert_close(ga[name], gb[name], rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="does not fit"):
        packing.pad_fixed(packing.collate(ex[:6], packing=True, pad_id=0), tokens=64, docs=8, max_doc=64)


def test_compiled_layers_give_the_eager_loss_and_gradients():
    ex = examples()
    counts = [len(e.input_ids) for e in ex]
    plans = [packing.plan_micro_batches(counts, token_budget=128, max_examples=2, packing=True, seed=0, epoch=0)]
    shape = compiled.fixed_shape(counts, plans, token_budget=128, max_length=64)
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager_cfg, compiled_cfg = config(compile="false"), config(compile="true")
    eager_cfg.lora.dropout = compiled_cfg.lora.dropout = 0.0
    eager, _, eager_plan = dm.prepare_model(model(), Tok(), eager_cfg, "cpu")
    comp, _, comp_plan = dm.prepare_model(model(), Tok(), compiled_cfg, "cpu")
    assert eager_plan["compile"] is False and comp_plan["compile"] == "default" and comp_plan["liger"] is False
    layers = compiled.decoder_layers(comp)
    assert layers and all(getattr(layer, "_compiled_call_impl", None) is not None for layer in layers)
    # The state dict keys are the eager model's: checkpoints and adapters do not see the compilation.
    assert eager.state_dict().keys() == comp.state_dict().keys()
    for mb in plans[0][:3]:
        batch = packing.pad_fixed(packing.collate([ex[i] for i in mb], packing=True, pad_id=0), **shape)
        a, ga = _grads(eager, batch)
        b, gb = _grads(comp, batch)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        for name in ga:
            torch.testing.assert_close(gb[name], ga[name], rtol=1e-4, atol=1e-6)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the compiled code did run


def test_a_compiled_run_resumes_bitwise(tmp_path):
    compiled_cfg = config(compile="true", epochs=1)
    reference, ref_recipe = run(tmp_path / "a", compiled_cfg)
    assert ref_recipe.plan["compile"] == "default" and ref_recipe.fixed_shape["tokens"] % 128 == 0
    assert ref_recipe.progress.step == ref_recipe.progress.total_steps >= 3

    stopped, _ = run(tmp_path / "b", compiled_cfg, stop_after=2)
    assert stopped is None
    resumed, recipe = run(tmp_path / "b", compiled_cfg)
    assert recipe.progress.losses == ref_recipe.progress.losses
    assert recipe.progress.evals == ref_recipe.progress.evals
    for name in reference:
        assert torch.equal(reference[name], resumed[name]), name

    # LoRA dropout is on (0.1): its masks come from the RNG state the checkpoint restores, under Inductor too.
    assert checkpoint.trainable_state(recipe.accelerator.unwrap_model(recipe.model)).keys() == reference.keys()


def test_auto_compiles_small_models_on_a_gpu_only(monkeypatch):
    monkeypatch.setattr(compiled, "liger_patched", lambda model=None: None)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    plain = dict(quantized=False, checkpointing=False, fsdp=False)
    assert compiled.decide("auto", cuda, 135_000_000, **plain)[0]
    assert compiled.decide("auto", cuda, 1_540_000_000, **plain)[0]
    assert not compiled.decide("auto", cuda, 8_030_000_000, **plain)[0]
    assert not compiled.decide("auto", cpu, 135_000_000, **plain)[0]
    assert compiled.decide("true", cpu, 135_000_000, **plain)[0]
    assert not compiled.decide("false", cuda, 135_000_000, **plain)[0]
    assert not compiled.decide("true", cuda, 135_000_000, **{**plain, "checkpointing": True})[0]
    assert not compiled.decide("true", cuda, 135_000_000, **{**plain, "quantized": True})[0]
    assert not compiled.decide("auto", cuda, 135_000_000, **plain, allowed=False)[0]
    # auto weighs the compile against the run: a short job stays eager, a long one compiles
    assert not compiled.decide("auto", cuda, 135_000_000, **plain, run_tokens=60_000)[0]
    assert compiled.decide("auto", cuda, 135_000_000, **plain, run_tokens=5_000_000)[0]
    assert compiled.decide("true", cuda, 135_000_000, **plain, run_tokens=60_000)[0]
    monkeypatch.setattr(compiled, "liger_patched", lambda model=None: "modeling_llama.LlamaRMSNorm")
    assert not compiled.decide("true", cuda, 135_000_000, **plain)[0]


def test_the_compile_cache_lives_under_the_roots_state_folder(tmp_path):
    root = tmp_path / "root"
    job = root / "queue" / "running" / "job-1"
    job.mkdir(parents=True)
    (root / "state").mkdir()
    assert compiled.root_cache_dir(job) == root / "state" / compiled.CACHE_FOLDER
    assert compiled.root_cache_dir(tmp_path / "elsewhere" / "job-2") is None
    assert compiled.root_cache_dir(None) is None


def test_stable_grad_buffers_for_cuda_graphs_train_the_same_adapter(monkeypatch):
    """Under CUDA graphs the recipe keeps .grad buffers of its own and zeroes them in place (the graphs' pool is
    overwritten by the next replay): the same adapter as set_to_none, with gradient accumulation."""
    cfg = config(compile="true", epochs=1, gradient_accumulation=3)
    cfg.lora.dropout = 0.0
    plain, _ = run(None, cfg)
    monkeypatch.setattr(compiled, "graphs", lambda plan: True)
    stable, recipe = run(None, cfg)
    assert all(p.grad is not None and not p.grad.any() for p in recipe.trainable)  # zeroed in place, kept
    for name in plain:
        assert torch.equal(plain[name], stable[name]), name


def test_compiled_layers_run_eagerly_outside_training_steps():
    """Evaluation, generation (a KV cache, a new length per token) and no-grad passes take the eager code: no
    recompile per shape."""
    import torch._dynamo

    cfg = config(compile="true")
    pm, _, plan = dm.prepare_model(model(), Tok(), cfg, "cpu")
    assert plan["compile"]
    torch._dynamo.utils.counters.clear()
    pm.eval()
    with torch.no_grad():
        for n in (5, 9, 13):
            pm(input_ids=torch.randint(2, 200, (1, n)))
        out = loss._causal_lm(pm).generate(input_ids=torch.randint(2, 200, (1, 4)), max_new_tokens=6,
                                            do_sample=False, pad_token_id=0)
    assert out.shape == (1, 10)
    assert not torch._dynamo.utils.counters["stats"]["unique_graphs"]
