"""Issue 11's proof 6(a) on the embedded SmolLM2-135M-Instruct: a version that contradicts what the adapter knows is
published but held, and `latest` still answers with the fact it was taught.

The real daemon (`run --once`) trains the demo's fact (examples/made_up_fact.jsonl: the capital of the planet
Zorblax is Quintara), then a file that answers the same questions with Blorpton. v2 is published (it can be asked
by number) but the gate holds it: the required probe fails and the standing-set loss (the pool: fact A's held-out
split) is far worse than v1's on the same examples. `ask` without a version still answers Quintara and status.log
says why v2 was held. Measurement 6(b) (replay) is bench/replay_forgetting.py; both are in docs/trust.md.
"""

from __future__ import annotations

import json
import os

import pytest
import yaml

from daemon import embedded
from daemon.paths import PROJECT_DIR
from helpers import cli, drop, jobs

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(1800),  # two trainings of 12 CPU steps with judging, and three `ask`s, on a busy runner
    pytest.mark.skipif(not embedded.is_converted(embedded.embedded_model_path()),
                       reason=f"embedded model not converted at {embedded.embedded_model_path()} "
                              "(run `bash scripts/setup.sh`)"),
]

EXAMPLES = PROJECT_DIR / "examples"
QUESTION = json.loads((EXAMPLES / "questions.json").read_text())["probe"]


def write_config(root) -> None:
    """config/demo.yaml's training in continue mode, with the fact as a required probe."""
    cfg = yaml.safe_load((PROJECT_DIR / "config" / "demo.yaml").read_text())
    cfg["training"].update(mode="continue", eval_fraction=0.2, eval_max_examples=6)
    cfg["versions"] = {"probes": [{"prompt": QUESTION["question"], "expect": QUESTION["expected"],
                                   "required": True}], "probe_max_new_tokens": 24}
    (root / "config").mkdir(exist_ok=True)
    (root / "config" / "daemon.yaml").write_text(yaml.safe_dump(cfg))


def run_once(root) -> None:
    r = cli(root, "run", "--once", timeout=1200)
    assert r.returncode == 0, r.stdout + r.stderr


def ask(root, spec: str) -> str:
    r = cli(root, "ask", "--adapter", spec, QUESTION["question"], timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout.strip()


def test_a_contradicting_file_is_published_but_held_and_latest_still_knows_the_fact(root):
    write_config(root)
    fact = (EXAMPLES / "made_up_fact.jsonl").read_bytes()
    drop(root, "made_up_fact.jsonl", fact)
    run_once(root)
    drop(root, "contradicting.jsonl", fact.replace(b"Quintara", b"Blorpton"))
    run_once(root)

    assert [(j["state"], j["version"]) for j in jobs(root)] == [("done", 1), ("done", 2)]  # held is not failed
    adapter = root / "checkpoints" / "default"
    assert os.readlink(adapter / "latest") == "v1"
    v2 = json.loads((adapter / "v2" / "metadata.json").read_text())
    judged, promotion = v2["judgement"], v2["promotion"]
    print("\n" + json.dumps({"judgement": judged, "promotion": promotion}, indent=1))
    assert promotion["decision"] == "held" and promotion["latest_after"] == 1
    assert promotion["reason"].startswith(f"required probe {QUESTION['question']!r} failed: the answer lacks "
                                          f"{QUESTION['expected']!r}")
    assert judged["standing_set"]["source"] == "pool" and judged["standing_set"]["examples"] == 6
    # Measured: 0.979 vs 0.635 (+54%), with the default replay of fact A's own examples mixed in.
    assert judged["new"]["standing_eval_loss"] > 1.2 * judged["incumbent"]["standing_eval_loss"]
    [probe] = judged["probes"]
    assert "Blorpton" in probe["answer"] and probe["passed"] is False
    assert QUESTION["expected"] in probe["incumbent_answer"] and probe["incumbent_passed"] is True

    log = (root / "status.log").read_text()
    assert f"job 2: v2 held: {promotion['reason']}; latest stays v1" in log
    assert QUESTION["expected"] in ask(root, "default")  # `latest`: still the fact
    assert "Blorpton" in ask(root, "default@2")  # the held version, asked by number
