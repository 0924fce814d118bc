"""`training-daemon compare ADAPTER@vA ADAPTER@vB`: two versions side by side from their metadata alone."""

from __future__ import annotations

import json

from test_promotion import publish

from helpers import cli

STANDING = {"source": "eval_file", "path": "/cfg/standing.jsonl", "sha256": "a" * 64, "examples": 4}


def judgement(standing_loss, own_loss, probes, incumbent=None, standing=STANDING) -> dict:
    return {"standing_set": standing, "new": {"standing_eval_loss": standing_loss, "own_eval_loss": own_loss},
            "incumbent": {"version": incumbent, "standing_eval_loss": None, "own_eval_loss": None, "note": None},
            "probes": probes}


def probe(prompt, answer, passed, incumbent_answer=None, incumbent_passed=None, **checks) -> dict:
    return {"prompt": prompt, "expect": checks.get("expect"), "must_not_contain": checks.get("must_not_contain"),
            "required": checks.get("required", False), "answer": answer, "passed": passed,
            "incumbent_answer": incumbent_answer, "incumbent_passed": incumbent_passed}


def test_two_versions_side_by_side_with_their_probes(root):
    publish(root, "promoted", 1, judgement=judgement(1.21, 1.3, [probe("Capital of France?", "Paris", True,
                                                                       expect="Paris", required=True)]))
    publish(root, "held", 2, reason="standing eval loss 1.84 vs 1.21 for v1 (+52%)",
            judgement=judgement(1.84, 1.1, [probe("Capital of France?", "Lyon", False, "Paris", True,
                                                  expect="Paris", required=True),
                                            probe("Say hi", "hi", None, "hello")], incumbent=1))
    r = cli(root, "compare", "default@1", "default@v2")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["default@v1", "(latest)", "default@v2"]
    row = {line.split("  ")[0]: line.split() for line in lines[1:13]}
    assert row["source file"][-2:] == ["file1.jsonl", "file2.jsonl"]
    assert row["standing eval loss"][-2:] == ["1.2100", "1.8400"] and row["own eval loss"][-2:] == ["1.3000", "1.1000"]
    assert "held: standing eval loss 1.84 vs 1.21 for v1 (+52%)" in r.stdout
    assert "note:" not in r.stdout  # one standing set: the losses compare
    probes = r.stdout[r.stdout.index("probes:"):]
    assert '1. "Capital of France?" (expect "Paris", required)\n     v1: "Paris"  passed\n     v2: "Lyon"  FAILED' \
        in probes
    # v1 never answered "Say hi" itself; v2's judgement asked it of v1 as its incumbent
    assert '2. "Say hi"\n     v1: "hello"  not checked\n     v2: "hi"  not checked' in probes

    data = json.loads(cli(root, "compare", "default@1", "default@2", "--json").stdout)
    assert (data["a"]["version"], data["a"]["is_latest"], data["b"]["decision"]) == (1, True, "held")
    assert data["same_standing_set"] is True
    assert data["probes"][1]["a"] == {"answer": "hello", "passed": None,
                                      "measured": "v2's judgement (as its incumbent)"}


def test_different_standing_sets_are_said_and_old_versions_show_dashes(root):
    publish(root, "promoted", 1)  # no judgement: a version from before the gate measured anything
    del_promotion = root / "checkpoints/default/v1/metadata.json"
    meta = json.loads(del_promotion.read_text())
    del meta["promotion"]
    del_promotion.write_text(json.dumps(meta))
    publish(root, "promoted", 2, judgement=judgement(0.9, 1.0, []))
    publish(root, "promoted", 3, judgement=judgement(0.8, 0.9, [], standing={**STANDING, "sha256": "b" * 64}))

    r = cli(root, "compare", "default@2", "default@3")
    assert r.returncode == 0 and "measured on different standing sets" in r.stdout and "probes: none recorded" in \
        r.stdout
    old = cli(root, "compare", "default@1", "default@3").stdout
    row = {line.split("  ")[0]: line for line in old.splitlines()}
    assert row["decision"].split()[1] == "-" and row["standing eval loss"].split()[3] == "-"

    for spec, words in (("default@7", "no published version default@7"), ("default", "name a version")):
        r = cli(root, "compare", "default@1", spec)
        assert r.returncode != 0 and words in r.stderr
