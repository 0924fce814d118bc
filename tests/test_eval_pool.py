"""The standing eval set: the adapter's eval pool (grows with each promoted job's held-out split, deduplicated,
bounded with a share per file) or versions.eval_file (a broken one fails the job at once, naming file and line).
"""

from __future__ import annotations

import hashlib
import json

import pytest

from daemon.config import from_dict
from daemon.trainer import eval_pool
from helpers import chat_lines, cli, drop, jobs, write_config


def records(topic: str, n: int) -> list[dict]:
    return [json.loads(line) for line in chat_lines(n, topic)]


def pool_lines(adapter_dir) -> list[dict]:
    return [json.loads(line) for line in (adapter_dir / eval_pool.POOL).read_text().splitlines()]


def test_the_pool_grows_across_jobs_without_duplicates(root):
    adapter_dir = root / "checkpoints" / "default"
    first = eval_pool.add_split(adapter_dir, records("a", 3), 1, "a.jsonl", limit=100)
    assert (first["examples"], first["added"]) == (3, 3)
    # The same records again (a retried publish, a file dropped twice, key order changed): nothing is added.
    again = [dict(reversed(list(r.items()))) for r in records("a", 3)]
    second = eval_pool.add_split(adapter_dir, again + records("b", 2), 2, "b.jsonl", limit=100)
    assert (second["examples"], second["added"]) == (5, 2)
    data = (adapter_dir / eval_pool.POOL).read_bytes()
    assert second["sha256"] == hashlib.sha256(data).hexdigest()
    rows = pool_lines(adapter_dir)
    assert [(r["_pool"]["job_id"], r["_pool"]["file"]) for r in rows] == [(1, "a.jsonl")] * 3 + [(2, "b.jsonl")] * 2
    assert rows[0]["messages"] == records("a", 3)[0]["messages"]  # the raw record, as the user wrote it
    assert rows[0]["_pool"]["sha256"] == eval_pool.record_sha256(records("a", 3)[0])


def test_a_full_pool_keeps_a_share_of_every_file(root):
    adapter_dir = root / "checkpoints" / "default"
    eval_pool.add_split(adapter_dir, records("a", 2), 1, "a.jsonl", limit=10)
    eval_pool.add_split(adapter_dir, records("b", 8), 2, "b.jsonl", limit=10)
    after = eval_pool.add_split(adapter_dir, records("c", 30), 3, "c.jsonl", limit=10)
    by_job = [r["_pool"]["job_id"] for r in pool_lines(adapter_dir)]
    # 10 places: a keeps its 2, b and c share the other 8.
    assert after["examples"] == 10 and by_job == [1, 1, 2, 2, 2, 2, 3, 3, 3, 3]


def test_trim_gives_the_remainder_and_keeps_order():
    entries = [{"i": i, "_pool": {"job_id": j}} for i, j in enumerate([1] * 5 + [2] * 5 + [3] * 5)]
    kept = eval_pool.trim(entries, 7)
    assert [e["_pool"]["job_id"] for e in kept] == [1, 1, 2, 2, 3, 3, 3]  # the remainder goes to the newest file
    assert [e["_pool"]["job_id"] for e in eval_pool.trim(entries, 8)] == [1, 1, 2, 2, 2, 3, 3, 3]
    assert eval_pool.trim(entries, 2) == [entries[5], entries[10]]  # more files than room: the newest keep one
    assert eval_pool.trim(entries, 100) == entries
    # Newest is by job id, not by size: jobs 9 and 7 keep one each, job 4 (the largest) none.
    mixed = [{"i": i, "_pool": {"job_id": j}} for i, j in enumerate([4] * 6 + [9] * 2 + [7])]
    assert [e["_pool"]["job_id"] for e in eval_pool.trim(mixed, 2)] == [9, 7]
    # job 7 keeps its 1, jobs 4 and 9 share 4, and the remainder (1) goes to job 9, the newest
    assert [e["_pool"]["job_id"] for e in eval_pool.trim(mixed + [{"_pool": {"job_id": 9}}], 6)] == \
        [4, 4, 9, 9, 7, 9]


def config(model_dir, **versions):
    return from_dict({"base_model": str(model_dir), "training": {"max_length": 128}, "versions": versions})


def test_the_standing_set_is_the_pool_before_the_job_tokenized_with_its_settings(root, tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    adapter_dir = root / "checkpoints" / "default"
    assert eval_pool.load_standing_set(config(tiny_model_dir), adapter_dir, tokenizer, tiny_model_dir).source == "none"
    long = [{"messages": [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "ok"}]}]
    eval_pool.add_split(adapter_dir, records("a", 3) + long, 1, "a.jsonl", limit=100)
    standing = eval_pool.load_standing_set(config(tiny_model_dir), adapter_dir, tokenizer, tiny_model_dir)
    assert standing.to_metadata() == {"source": "pool", "path": str(adapter_dir / eval_pool.POOL),
                                      "sha256": hashlib.sha256(standing.data).hexdigest(), "examples": 3}
    assert standing.data == (adapter_dir / eval_pool.POOL).read_bytes()
    assert standing.notes == ["1 eval pool records do not fit this job's settings: left out"]
    off = eval_pool.load_standing_set(config(tiny_model_dir, eval_pool_max_examples=0), adapter_dir, tokenizer,
                                      tiny_model_dir)
    assert off.source == "none"


def test_a_damaged_pool_line_is_left_out_with_a_note_and_the_rest_still_serves(root, tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    adapter_dir = root / "checkpoints" / "default"
    eval_pool.add_split(adapter_dir, records("a", 3), 1, "a.jsonl", limit=100)
    path = adapter_dir / eval_pool.POOL
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(lines[0] + b'{"messages": [{"role": "us\x00\xff\n' + b"".join(lines[1:]))
    standing = eval_pool.load_standing_set(config(tiny_model_dir), adapter_dir, tokenizer, tiny_model_dir)
    assert (standing.source, len(standing.examples)) == ("pool", 3)
    assert standing.notes == [f"1 eval pool line(s) are not JSON ({eval_pool.POOL} line 2): left out"]
    assert eval_pool.add_split(adapter_dir, records("b", 1), 2, "b.jsonl", limit=100)["examples"] == 4
    path.write_text("not json\n")
    alone = eval_pool.load_standing_set(config(tiny_model_dir), adapter_dir, tokenizer, tiny_model_dir)
    assert (alone.source, alone.notes) == ("none", [f"1 eval pool line(s) are not JSON ({eval_pool.POOL} line 1): "
                                                    "left out"])


def test_an_eval_file_is_the_standing_set_and_a_broken_one_names_its_line(root, tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    good = root / "eval.jsonl"
    good.write_text("\n".join(chat_lines(5, "e")) + "\n")
    cfg = config(tiny_model_dir, eval_file=str(good))
    standing = eval_pool.load_standing_set(cfg, root, tokenizer, tiny_model_dir)
    assert (standing.source, len(standing.examples), standing.sha256) == \
        ("eval_file", 5, hashlib.sha256(good.read_bytes()).hexdigest())

    bad = root / "bad.jsonl"
    bad.write_text("\n".join(chat_lines(2, "e")) + '\n{"messages": [{"role": "user"}]}\n')
    with pytest.raises(eval_pool.EvalFileError, match=rf"^versions.eval_file {bad} is not a usable eval set: .*line 3"):
        eval_pool.load_standing_set(config(tiny_model_dir, eval_file=str(bad)), root, tokenizer, tiny_model_dir)


@pytest.mark.slow
def test_a_broken_eval_file_fails_the_job_before_training_as_a_config_error(root, tiny_model_dir):
    (root / "config").mkdir()
    (root / "config" / "eval.jsonl").write_text("\n".join(chat_lines(2, "e")) + "\nnot json\n")
    write_config(root, tiny_model_dir, versions={"eval_file": "eval.jsonl"})
    drop(root, "data.jsonl", chat_lines(4))
    r = cli(root, "run", "--once")
    [job] = jobs(root)
    assert job["state"] == "failed", r.stdout
    error = json.loads((root / "queue" / "failed" / "j000001" / "error.json").read_text())
    assert error["kind"] == "bad_config"
    assert error["message"].startswith(f"versions.eval_file {root / 'config' / 'eval.jsonl'} is not a usable eval set")
    assert "line 3" in error["message"]
    assert not (root / "queue" / "failed" / "j000001" / "resume").exists()  # no step was trained


def test_a_preference_eval_file_is_refused_like_any_broken_one(root, tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Question {i}?", "chosen": f"Good {i}.", "rejected": f"Bad {i}."})
                             + "\n" for i in range(3)))
    with pytest.raises(eval_pool.EvalFileError, match=r"^versions.eval_file must be a supervised file \(messages, "
                       r"prompt/completion, \.\.\.\), not preference pairs: .*pairs.jsonl$"):
        eval_pool.load_standing_set(config(tiny_model_dir, eval_file=str(pairs)), root, tokenizer, tiny_model_dir)
