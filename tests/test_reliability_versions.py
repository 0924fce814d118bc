"""Published versions are trusted only as far as they can be checked: a version records the digest of each of
its files and the fingerprint of the base it was trained on; a damaged version, a leftover half folder or a
base replaced under the same path never ends up under a new job or in `ask`/`export`, and never blocks the queue.

The damage is done by hand, as a disk error, a careless copy or an upgrade of the base folder would do it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from accounting import Inbox, account
from daemon import versions
from daemon.trainer.fingerprint import base_fingerprint, safetensors_header
from helpers import chat_lines, cli, write_config


def metadata(root: Path, version: int) -> dict:
    return json.loads((root / "checkpoints" / "default" / f"v{version}" / "metadata.json").read_text())


def log_line(root: Path, text: str) -> str:
    """The one status.log line that says `text`."""
    lines = [line for line in (root / "status.log").read_text().splitlines() if text in line]
    assert len(lines) == 1, f"{text!r} in {len(lines)} lines of status.log"
    return lines[0]


def build_other_width_model(like: Path, out: Path, hidden_size: int = 32) -> Path:
    """The same tokenizer and architecture as `like`, another hidden size: an adapter for one fails on the other."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    shutil.copytree(like, out)
    config = AutoConfig.from_pretrained(like)
    config.hidden_size, config.intermediate_size = hidden_size, 2 * hidden_size
    config.head_dim = hidden_size // config.num_attention_heads
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    return out


# ------------------------------------------------------------------ the real daemon

@pytest.mark.slow
def test_a_base_replaced_at_the_same_path_trains_from_the_base_with_a_note(root, tiny_model_dir):
    base = shutil.copytree(tiny_model_dir, root / "base")
    write_config(root, base)
    inbox = Inbox(root)
    inbox.drop("first.jsonl", chat_lines(4, "first"))
    assert cli(root, "run", "--once").returncode == 0
    assert metadata(root, 1)["base_model_fingerprint"] == base_fingerprint(base)

    shutil.rmtree(base)  # an upgrade of the base in place: same folder, another model
    build_other_width_model(tiny_model_dir, base)
    inbox.drop("second.jsonl", chat_lines(4, "second"))
    inbox.drop("third.jsonl", chat_lines(4, "third"))
    r = cli(root, "run", "--once", timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr

    fates = account(root, inbox, expect={name: "done" for name in ("first.jsonl", "second.jsonl", "third.jsonl")})
    assert [fates[n]["version"] for n in ("first.jsonl", "second.jsonl", "third.jsonl")] == [1, 2, 3]
    v2, v3 = metadata(root, 2), metadata(root, 3)
    note = f"latest version v1 was trained on another model than the one now at {base}"
    assert v2["parent_version"] is None and note in v2["parent_notes"][0]
    assert "training from the base model instead" in v2["parent_notes"][0]
    assert " INFO  job 2: " + note in log_line(root, note)
    assert v2["base_model_fingerprint"] == base_fingerprint(base) != metadata(root, 1)["base_model_fingerprint"]
    assert v3["parent_version"] == 2 and v3["parent_notes"] == []  # the same base again: continued as usual
    for job in fates.values():
        assert "size mismatch" not in (Path(job["dir"]) / "trainer.log").read_text()


@pytest.mark.slow
def test_a_damaged_version_is_reported_and_skipped_for_the_newest_sound_one(root, tiny_model_dir):
    write_config(root, tiny_model_dir)
    inbox = Inbox(root)
    inbox.drop("first.jsonl", chat_lines(4, "first"))
    inbox.drop("second.jsonl", chat_lines(4, "second"))
    assert cli(root, "run", "--once", timeout=600).returncode == 0
    weights = root / "checkpoints/default/v2/adapter_model.safetensors"
    published = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(published // 2)  # a copy cut short

    for command in (["ask", "What is first number 1?", "--adapter", "default@2"],
                    ["export", "default@2", "--merge", str(root / "merged")]):
        r = cli(root, *command)
        assert r.returncode != 0 and "Traceback" not in r.stderr
        assert r.stderr.strip() == (f"Error: version default@2 is damaged and cannot be used: "
                                    f"adapter_model.safetensors has {published // 2} bytes, {published} were published")
    assert not (root / "merged").exists()

    inbox.drop("third.jsonl", chat_lines(4, "third"))
    r = cli(root, "run", "--once")
    assert r.returncode == 0, r.stdout + r.stderr
    job = account(root, inbox, expect={"third.jsonl": "done"})["third.jsonl"]
    assert job["version"] == 3
    v3 = metadata(root, 3)
    assert v3["parent_version"] == 1
    warning = "version v2 of default is damaged (adapter_model.safetensors has"
    assert warning in v3["parent_notes"][0] and " WARNING job 3: " + warning in log_line(root, warning)
    assert not versions.problems(root / "checkpoints/default/v3")


@pytest.mark.slow
def test_a_leftover_version_folder_never_blocks_the_next_publish(root, tiny_model_dir):
    write_config(root, tiny_model_dir)
    inbox = Inbox(root)
    inbox.drop("first.jsonl", chat_lines(4, "first"))
    assert cli(root, "run", "--once").returncode == 0
    leftover = shutil.copytree(root / "checkpoints/default/v1", root / "checkpoints/default/v2")
    (leftover / "metadata.json").unlink()  # a folder copied by hand, or restored from a backup, cut short

    inbox.drop("second.jsonl", chat_lines(4, "second"))
    r = cli(root, "run", "--once")
    assert r.returncode == 0, r.stdout + r.stderr  # it used to fail every later job: "Directory not empty"
    job = account(root, inbox, expect={"second.jsonl": "done"})["second.jsonl"]
    assert job["version"] == 3 and metadata(root, 3)["parent_version"] == 1
    warning = "version v2 of default is damaged (no metadata.json: an incomplete version): skipped"
    assert " WARNING job 2: " + warning in log_line(root, warning)
    assert sorted(p.name for p in leftover.iterdir()) == sorted(p.name for p in (root / "checkpoints/default/v1")
                                                                .iterdir() if p.name != "metadata.json")
    assert (root / "checkpoints/default/latest").readlink() == Path("v3")


# ------------------------------------------------------------------ the pieces, in process

def test_the_next_number_passes_every_folder_complete_or_not(root):
    adapter_dir = root / "checkpoints" / "default"
    assert versions.next_version(adapter_dir) == 1
    for name in ("v1", "v4", "v10-old", ".tmp-job3-1"):
        (adapter_dir / name).mkdir(parents=True)
    (adapter_dir / "v1" / "metadata.json").write_text("{}")
    assert versions.next_version(adapter_dir) == 5  # v4 holds no metadata.json, but its name is taken
    assert versions.versions(adapter_dir) == [1]


def test_a_version_is_checked_against_the_digests_it_was_published_with(root):
    adapter_dir = root / "checkpoints" / "default"
    staged = versions.staging_dir(adapter_dir, 1)
    (staged / "adapter_config.json").write_text("{}")
    (staged / "adapter_model.safetensors").write_bytes(b"x" * 100)
    (staged / "sub").mkdir()
    (staged / "sub" / "extra.txt").write_text("kept")
    version, path = versions.publish(adapter_dir, staged, {"job_id": 1})
    assert set(metadata_files := json.loads((path / "metadata.json").read_text())["files"]) == {
        "adapter_config.json", "adapter_model.safetensors", "sub/extra.txt"}
    assert metadata_files["adapter_model.safetensors"]["bytes"] == 100
    assert versions.problems(path) == []

    (path / "adapter_model.safetensors").write_bytes(b"y" * 100)  # same size, other bytes
    (path / "sub" / "extra.txt").unlink()
    assert versions.problems(path) == [
        "adapter_model.safetensors does not match the sha256 recorded when it was published",
        "sub/extra.txt is missing"]
    (path / "metadata.json").write_text("{not json")
    assert versions.problems(path)[0].startswith("metadata.json is unreadable")

    seen = []
    assert versions.newest_sound_version(adapter_dir, lambda v, found: seen.append(v)) is None
    assert seen == [1]


def test_a_version_from_before_digests_needs_its_adapter_files(root):
    legacy = root / "v1"
    legacy.mkdir()
    (legacy / "metadata.json").write_text(json.dumps({"job_id": 1}))
    (legacy / "adapter_config.json").write_text("{}")
    assert versions.problems(legacy) == ["adapter_model.safetensors is missing"]
    (legacy / "adapter_model.safetensors").write_bytes(b"")
    assert versions.problems(legacy) == []


def test_the_base_fingerprint_follows_content_not_path_and_reads_no_weights(root, tiny_model_dir):
    copy = shutil.copytree(tiny_model_dir, root / "copy")
    assert base_fingerprint(copy) == base_fingerprint(tiny_model_dir)
    (copy / "README.md").write_text("notes about the model")  # not part of what the model is
    assert base_fingerprint(copy) == base_fingerprint(tiny_model_dir)

    header = safetensors_header(copy / "model.safetensors")
    assert b'"dtype"' in header and b'"shape"' in header
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # a weight byte, past the header: the fingerprint does not hash weights
    weights.write_bytes(bytes(data))
    assert base_fingerprint(copy) == base_fingerprint(tiny_model_dir)

    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "rope_theta": 1234.0}))
    assert base_fingerprint(copy) != base_fingerprint(tiny_model_dir)


def test_the_page_and_metrics_show_a_damaged_version(root):
    import urllib.request

    from daemon.paths import Layout
    from daemon.supervisor.web import start_web

    layout = Layout.at(root).ensure()
    adapter_dir = layout.adapter_dir("default")
    for job_id in (1, 2):
        staged = versions.staging_dir(adapter_dir, job_id)
        (staged / "adapter_model.safetensors").write_bytes(b"x" * 100)
        versions.publish(adapter_dir, staged, {"adapter": "default", "job_id": job_id})
    (adapter_dir / "v1" / "adapter_model.safetensors").write_bytes(b"x" * 10)
    (adapter_dir / "v3").mkdir()  # a leftover without metadata.json

    server = start_web(layout, "127.0.0.1", 0)
    try:
        with urllib.request.urlopen(server.url + "api/versions", timeout=10) as r:
            rows = json.loads(r.read())
        with urllib.request.urlopen(server.url + "metrics", timeout=10) as r:
            metrics = r.read().decode()
    finally:
        server.stop()
    assert [(row["version"], row["damaged"]) for row in rows] == [
        (2, []), (1, ["adapter_model.safetensors has 10 bytes, 100 were published"])]
    assert 'training_daemon_adapter_damaged_versions{adapter="default"} 2.0' in metrics
