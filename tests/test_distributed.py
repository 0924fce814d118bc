"""A job on several processes: how the daemon launches the ranks, and what 2 gloo processes on CPU train.

The launch tests need no torch. The training tests run the real daemon on the tiny model with
`cpu_processes: 2` (CUDA_VISIBLE_DEVICES="" keeps them on the CPU on a GPU host too) and compare the
published adapters with a 1-process run of the same config: the effective batch is the config's
micro_batch_size x gradient_accumulation whatever the number of processes, so the adapters agree up to
the order of fp32 additions (measured: max abs difference ~1e-8 on weights of ~1e-2).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file

from daemon import protocol
from daemon.supervisor import launch
from daemon.paths import UserError
from helpers import chat_lines, cli, drop, events, jobs, start_daemon, wait_for, write_config

# --------------------------------------------------------------------------- launch (no torch)


def test_grant_follows_the_config_and_the_visible_gpus():
    assert launch.grant("all", 1, None) == launch.Grant(1, None)  # no NVML: one process, environment untouched
    assert launch.grant("all", 2, []) == launch.Grant(2, None)  # no GPU visible: cpu_processes
    assert launch.grant("all", 2, ["0", "1", "2"]) == launch.Grant(3, ("0", "1", "2"))  # cpu_processes ignored
    assert launch.grant(2, 1, ["0", "1", "2"]) == launch.Grant(2, ("0", "1"))
    assert launch.grant([2, 0], 1, ["0", "1", "2"]) == launch.Grant(2, ("2", "0"))
    assert launch.grant(1, 1, ["GPU-aa", "GPU-bb"]) == launch.Grant(1, ("GPU-aa",))
    with pytest.raises(UserError, match=r"gpus: 4 asked for, but only 2 visible \(0, 1\)"):
        launch.grant(4, 1, ["0", "1"])
    with pytest.raises(UserError, match=r"gpus: GPU 5 not visible to the daemon \(visible: 2, 3\)"):
        launch.grant([2, 5], 1, ["2", "3"])
    # GPUs asked for by number where none is seen: an error, not a silent fall back to the CPU or to GPU 0
    with pytest.raises(UserError, match=r"gpus: 2 asked for, but the daemon sees no GPU \(NVML is not available"):
        launch.grant(2, 1, None)
    with pytest.raises(UserError, match=r"gpus: \[1\] asked for, but the daemon sees no GPU$"):
        launch.grant([1], 1, [])


def test_rank_environment_is_torchruns():
    base = {"PATH": "/bin", "RANK": "7", "MASTER_PORT": "1", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    g = launch.Grant(2, ("2", "3"))
    envs = [launch.rank_env(base, g, rank, 29555) for rank in range(2)]
    for rank, env in enumerate(envs):
        assert env["RANK"] == env["LOCAL_RANK"] == env["ROLE_RANK"] == str(rank)
        assert env["WORLD_SIZE"] == env["LOCAL_WORLD_SIZE"] == env["ROLE_WORLD_SIZE"] == "2"
        assert (env["MASTER_ADDR"], env["MASTER_PORT"], env["GROUP_RANK"]) == ("127.0.0.1", "29555", "0")
        assert env["CUDA_VISIBLE_DEVICES"] == "2,3" and env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
        assert env["OMP_NUM_THREADS"] == "1" and env["PATH"] == "/bin"
    assert base["RANK"] == "7"  # the daemon's own environment is not touched

    single = launch.rank_env(base, launch.Grant(1, ("1",)), 0, 0)
    assert not set(launch.DIST_VARS) & set(single)  # a lone trainer must not believe it is one rank of several
    assert single["CUDA_VISIBLE_DEVICES"] == "1" and "OMP_NUM_THREADS" not in single
    assert launch.rank_env(base, launch.Grant(1, None), 0, 0)["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:  # outgoing connections never take it first
        assert 1024 <= launch.free_port() < int(f.read().split()[0])


def test_job_exit_code_names_the_cause_not_the_consequence():
    code = launch.job_exit_code
    assert code([0, 0], set()) == protocol.DONE
    assert code([75, 75], set()) == protocol.STOPPED
    assert code([1, protocol.OUT_OF_MEMORY], set()) == protocol.OUT_OF_MEMORY  # rank 0 failed in a collective
    assert code([protocol.DISK_FULL, 0], set()) == protocol.DISK_FULL  # rank 0 could not publish
    assert code([1, -9], set()) == -9  # rank 1 killed (the OOM killer, kill -9): the gloo error is its consequence
    assert code([-9, 1], {0}) == 1  # rank 0 killed by the daemon after rank 1 failed
    assert code([-9, -9], {0, 1}) == -9  # a cold stop
    assert code([75, -9], {1}) == protocol.STOPPED
    assert code([-9, 0], {0}) == -9  # rank 0 killed while still publishing: not done, though rank 1 finished
    assert launch.describe_status(-40) == "signal 40"  # a realtime signal has no name


def test_memory_plan_shards_the_base_only_when_it_does_not_fit_one_gpu():
    from daemon.trainer import memory_plan

    llama_8b = memory_plan.Shape(n_params=8_030_000_000, n_layers=32, hidden=4096, intermediate=14336,
                                 vocab=128256, n_kv_heads=8, head_dim=128)

    def plan(free_gib, world_size, **kw):
        return memory_plan.plan_memory(llama_8b, free_bytes=free_gib * 1024**3 if free_gib else None,
                                       max_length=1024, micro_batch_size=8, world_size=world_size, **kw)

    assert not plan(78, 4).fsdp  # fits one GPU: plain data parallel
    small = plan(12, 4, can_quantize=True)  # 16 GB of bf16 weights cannot fit 12 GiB whole
    assert small.fsdp and not small.quantize_4bit and "sharded over 4 GPUs" in small.reason
    assert small.estimated_peak_gib <= small.budget_gib
    assert plan(12, 1, can_quantize=True).quantize_4bit  # one GPU: 4-bit is what is left
    assert plan(78, 4, sharding="true").fsdp and not plan(12, 4, sharding="false").fsdp
    assert plan(None, 2, sharding="true").fsdp and not plan(None, 1, sharding="true").fsdp  # CPU: only if asked


SLEEPER = [sys.executable, "-c", "import os, sys, time; print(os.getpgid(0), flush=True); time.sleep(120)"]


def test_ranks_share_one_group_and_a_dead_rank_ends_them_all(tmp_path):
    lifeline_r, lifeline_w = os.pipe()
    ranks = launch.start(SLEEPER, launch.Grant(3, None), dict(os.environ), tmp_path, pass_fds=(lifeline_r,),
                         cwd=tmp_path)
    os.close(lifeline_r)
    try:
        assert int(ranks.stdout.readline()) == ranks.pid  # rank 0 leads the group ...
        for p in ranks.procs:
            assert os.getpgid(p.pid) == ranks.pid  # ... and every rank is in it
            assert os.readlink(f"/proc/{p.pid}/fd/{lifeline_r}").startswith("pipe:")  # each holds the lifeline
        assert ranks.poll() is None and ranks.failed_rank() is None

        os.kill(ranks.procs[1].pid, signal.SIGKILL)
        failed = wait_for(ranks.failed_rank, timeout=10, what="the dead rank to be seen")
        assert failed == (1, -signal.SIGKILL) and ranks.failed_rank() is None  # reported once
        ranks.kill()
        assert ranks.wait() == -signal.SIGKILL  # rank 1's own death; the others were the daemon's doing
        assert ranks.collateral == {0, 2}
        assert (tmp_path / "trainer.log").exists() and (tmp_path / "trainer-rank2.log").exists()
    finally:
        ranks.kill()
        os.close(lifeline_w)


def test_a_warm_stop_signal_reaches_every_rank(tmp_path):
    trap = [sys.executable, "-c", "import signal, sys, time\n"
            "signal.signal(signal.SIGUSR1, lambda *_: sys.exit(75))\nprint('ready', flush=True)\ntime.sleep(60)"]
    ranks = launch.start(trap, launch.Grant(2, None), dict(os.environ), tmp_path, pass_fds=(), cwd=tmp_path)
    try:
        assert ranks.stdout.readline().strip() == b"ready"
        time.sleep(0.5)  # rank 1 installs its handler too (it reports to no one)
        ranks.send_signal(signal.SIGUSR1)
        assert ranks.wait() == protocol.STOPPED
        assert [p.returncode for p in ranks.procs] == [75, 75]
    finally:
        ranks.kill()


# --------------------------------------------------------------------------- training on 2 gloo processes

# 20 optimizer steps of 4 micro-batches (2 per rank; some windows at an epoch's end hold 1-3) and an eval.
TRAINING = {"micro_batch_size": 1, "gradient_accumulation": 4, "epochs": 10, "checkpoint_every_steps": 15,
            "eval_fraction": 0.1, "eval_max_examples": 3}
CPU_ONLY = {"CUDA_VISIBLE_DEVICES": ""}
# From step 2 on, each micro-batch waits a little (the documented fault hook's `sleep`: numbers unchanged), so a
# stop or a kill sent after step 2 lands mid-training however fast the machine is.
SLOW_STEPS = {"TRAINING_DAEMON_FAULTS": json.dumps([{"point": "train_step", "kind": "sleep", "seconds": 0.2,
                                                      "min_step": 2}])}


def configure(root, model_dir, processes: int, **training):
    write_config(root, model_dir, training={**TRAINING, **training}, cpu_processes=processes,
                 limits={"max_attempts": 1, "min_free_disk_mb": 1})
    drop(root, "data.jsonl", chat_lines(30))


def adapter(root, version=1) -> dict[str, torch.Tensor]:
    return load_file(str(root / "checkpoints" / "default" / f"v{version}" / "adapter_model.safetensors"))


def metadata(root, version=1) -> dict:
    return json.loads((root / "checkpoints" / "default" / f"v{version}" / "metadata.json").read_text())


def train(root) -> None:
    r = cli(root, "run", "--once", **CPU_ONLY)
    assert r.returncode == 0, f"{r.stdout[-3000:]}{r.stderr[-3000:]}\njobs: {jobs(root)}"


@pytest.fixture(scope="module")
def references(tmp_path_factory, tiny_model_dir):
    """The same job trained on 1 and on 2 processes."""
    out = {}
    for processes in (1, 2):
        root = tmp_path_factory.mktemp(f"reference-{processes}")
        configure(root, tiny_model_dir, processes)
        train(root)
        out[processes] = root
    return out


def assert_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
@pytest.mark.timeout(900)  # the module's reference runs (3 trainer launches) count against this test's time
def test_two_processes_train_the_adapter_one_process_trains(references):
    one, two = references[1], references[2]
    m1, m2 = metadata(one), metadata(two)
    assert (m1["plan"]["processes"], m2["plan"]["processes"]) == (1, 2)
    assert m1["steps"] == m2["steps"] >= 16
    assert m1["optimizer"]["gradient_accumulation"] == m2["optimizer"]["gradient_accumulation"] == 4
    assert m1["tokens_trained"] == m2["tokens_trained"]
    assert_close(adapter(one), adapter(two))
    assert m2["eval_loss"] == pytest.approx(m1["eval_loss"], rel=1e-5)  # every rank's share of the eval set
    assert [s for s, _ in m1["loss_history"]] == [s for s, _ in m2["loss_history"]]
    for (_, l1), (_, l2) in zip(m1["loss_history"], m2["loss_history"]):
        assert l2 == pytest.approx(l1, rel=1e-5)
    job = jobs(two)[0]
    assert (two / "queue" / "done" / f"j{job['id']:06d}" / "trainer-rank1.log").exists()


@pytest.mark.slow
@pytest.mark.timeout(900)  # the module's reference runs (3 trainer launches) count against this test's time
def test_two_processes_stopped_warm_resume_to_the_same_adapter(root, tiny_model_dir, references):
    configure(root, tiny_model_dir, 2)
    stopped_at = stop_mid_training(root)
    assert 3 <= stopped_at < metadata(references[2])["steps"]  # mid-training, not at the end

    train(root)
    assert [e["step"] for e in events(root, "resumed")] == [stopped_at]
    resumed, uninterrupted = adapter(root), adapter(references[2])
    assert resumed.keys() == uninterrupted.keys()
    for name in resumed:  # the same reductions in the same order: exact
        assert torch.equal(resumed[name], uninterrupted[name]), name


@pytest.mark.slow
def test_a_rank_killed_ends_the_job_and_the_other_rank(root, tiny_model_dir):
    configure(root, tiny_model_dir, 2)
    daemon = start_daemon(root, "--once", **CPU_ONLY, **SLOW_STEPS)
    try:
        wait_for(lambda: [e for e in events(root, "progress") if e["step"] >= 2], timeout=120, what="step 2")
        trainers = [p for p in psutil.Process(daemon.pid).children()
                    if "daemon.trainer.main" in " ".join(p.cmdline())]
        by_rank = {int(p.environ()["RANK"]): p for p in trainers}
        assert sorted(by_rank) == [0, 1]
        by_rank[1].send_signal(signal.SIGKILL)
        assert daemon.wait(timeout=60) == 1  # --once: a job failed; and no rank waits forever in a collective
    finally:
        if daemon.poll() is None:
            daemon.kill()
    for p in by_rank.values():
        assert not p.is_running(), f"rank process {p.pid} survived"
    (job,) = jobs(root)
    assert job["folder"] == "failed" and "killed by signal 9" in job["error"]
    assert "rank 1 exited with signal 9 (SIGKILL); stopping the other ranks" in (root / "status.log").read_text()


def stop_mid_training(root) -> int:
    """Start the daemon, warm-stop it after step 3; the step its checkpoint holds."""
    daemon = start_daemon(root, **CPU_ONLY, **SLOW_STEPS)
    try:
        wait_for(lambda: [e for e in events(root, "progress") if e["step"] >= 3], timeout=120, what="step 3")
        daemon.send_signal(signal.SIGTERM)  # warm stop: the daemon sends SIGUSR1 to every rank
        assert daemon.wait(timeout=120) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
    (job,) = jobs(root)
    assert job["folder"] == "pending" and job["attempts"][-1]["outcome"] == "stopped", job
    ckpt = sorted((root / "queue" / "pending" / f"j{job['id']:06d}" / "resume").glob("step-*"))[-1]
    assert {"rng.pt", "rng-rank1.pt"} <= {f.name for f in ckpt.iterdir()}  # each rank's RNG state
    return json.loads((ckpt / "progress.json").read_text())["step"]


@pytest.mark.slow
@pytest.mark.timeout(900)  # the module's reference runs (3 trainer launches) count against this test's time
def test_fsdp_on_two_processes_trains_and_resumes_to_the_same_adapter(root, tiny_model_dir, references):
    """FSDP2 (`fully_shard`) runs on CPU with gloo: forced on here, since on CPU nothing needs it."""
    configure(root, tiny_model_dir, 2, fsdp=True)
    stopped_at = stop_mid_training(root)
    job_dir = root / "queue" / "pending" / f"j{jobs(root)[0]['id']:06d}"
    saved = load_file(str(sorted((job_dir / "resume").glob("step-*"))[-1] / "adapter.safetensors"))

    train(root)
    assert [e["step"] for e in events(root, "resumed")] == [stopped_at]
    meta = metadata(root)
    assert meta["plan"]["fsdp"] is True and meta["plan"]["processes"] == 2
    assert meta["steps"] == metadata(references[1])["steps"]
    assert_close(adapter(references[1]), adapter(root))
    published = adapter(root)  # the checkpoint held whole tensors, gathered from the shards
    assert {n.replace(".default", "") for n in saved} == set(published)
    for name, tensor in saved.items():
        assert tensor.shape == published[name.replace(".default", "")].shape, name
