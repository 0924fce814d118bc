"""`training-daemon compare ADAPTER@vA ADAPTER@vB`: two versions side by side, from their metadata.json alone
(no model is loaded): where each came from, the promotion gate's verdict, the losses it judged by, each probe's
answers. Standing eval losses are comparable only when measured on the same standing set (its sha256 says)."""

from __future__ import annotations

import json

from daemon.paths import Layout, UserError
from daemon.promotion import gate_verdict, parse_spec, promoted
from daemon.textsafe import for_terminal
from daemon.versions import read_metadata

ROWS = (("source file", "source_file"), ("job", "job_id"), ("finished", "finished_at"), ("base model", "base_model"),
        ("mode", "mode"), ("parent", "parent_version"), ("steps", "steps"), ("final train loss", "final_train_loss"),
        ("standing eval loss", "standing_eval_loss"), ("own eval loss", "own_eval_loss"),
        ("standing set", "standing_set"), ("decision", "decision"))


def side(layout: Layout, spec: str) -> tuple[dict, dict]:
    """(the fields compare shows of one version, its full metadata)."""
    name, version = parse_spec(spec, need_version=True)
    adapter_dir = layout.checkpoints / name
    try:
        meta = read_metadata(adapter_dir, version)
    except FileNotFoundError:
        raise UserError(f"no published version {name}@{version} under {layout.checkpoints}") from None
    except (OSError, ValueError) as e:
        raise UserError(f"the metadata.json of {name}@{version} cannot be read: {e}") from None
    j = meta.get("judgement") if isinstance(meta.get("judgement"), dict) else {}
    new = j.get("new") if isinstance(j.get("new"), dict) else {}
    standing = j.get("standing_set") if isinstance(j.get("standing_set"), dict) else {}
    verdict = gate_verdict(meta)
    latest = promoted(adapter_dir)
    out = {"adapter": name, "version": version, "latest": latest, "is_latest": latest == version,
           **{k: meta.get(k) for k in ("job_id", "source_file", "finished_at", "base_model", "mode", "parent_version",
                                       "steps", "final_train_loss")},
           "standing_eval_loss": new.get("standing_eval_loss"),
           "own_eval_loss": new.get("own_eval_loss", meta.get("eval_loss")),
           "standing_set": {k: standing.get(k) for k in ("source", "path", "sha256", "examples")} if standing else None,
           "decision": verdict["decision"] if verdict["judged"] else None, "reason": verdict["reason"],
           "incumbent": (j.get("incumbent") or {}).get("version") if isinstance(j.get("incumbent"), dict) else None}
    return out, meta


def _probes(meta: dict) -> list[dict]:
    found = (meta.get("judgement") or {}).get("probes") if isinstance(meta.get("judgement"), dict) else None
    return [p for p in found or [] if isinstance(p, dict) and isinstance(p.get("prompt"), str)]


def _answer(me: dict, my_meta: dict, other: dict, other_meta: dict, prompt: str) -> dict | None:
    """This version's answer to a probe: from its own judgement, else from the other version's, when that one
    was judged against this one (its incumbent answers)."""
    for p in _probes(my_meta):
        if p["prompt"] == prompt:
            return {"answer": p.get("answer"), "passed": p.get("passed"), "measured": f"v{me['version']}'s judgement"}
    if other["adapter"] == me["adapter"] and other.get("incumbent") == me["version"]:
        for p in _probes(other_meta):
            if p["prompt"] == prompt and "incumbent_answer" in p:
                return {"answer": p.get("incumbent_answer"), "passed": p.get("incumbent_passed"),
                        "measured": f"v{other['version']}'s judgement (as its incumbent)"}
    return None


def compare(layout: Layout, spec_a: str, spec_b: str) -> dict:
    a, meta_a = side(layout, spec_a)
    b, meta_b = side(layout, spec_b)
    sha_a, sha_b = ((x["standing_set"] or {}).get("sha256") for x in (a, b))
    same = None if not (sha_a and sha_b) else sha_a == sha_b
    prompts: list[str] = []
    for p in _probes(meta_a) + _probes(meta_b):
        if p["prompt"] not in prompts:
            prompts.append(p["prompt"])
    probes = []
    for prompt in prompts:
        spec = next(p for p in _probes(meta_a) + _probes(meta_b) if p["prompt"] == prompt)
        probes.append({"prompt": prompt, "expect": spec.get("expect"), "must_not_contain": spec.get("must_not_contain"),
                       "required": spec.get("required"), "a": _answer(a, meta_a, b, meta_b, prompt),
                       "b": _answer(b, meta_b, a, meta_a, prompt)})
    return {"a": a, "b": b, "same_standing_set": same, "probes": probes}


def _cell(x: dict, key: str) -> str:
    value = x.get(key)
    if key == "decision":
        if value is None:
            return "-"
        return value + (f": {x['reason']}" if x.get("reason") else "")
    if key == "standing_set":
        if not value or value.get("source") in (None, "none"):
            return "none" if value else "-"
        return f"{value['source']} ({str(value.get('sha256') or '?')[:12]})"
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _title(x: dict) -> str:
    return f"{x['adapter']}@v{x['version']}" + (" (latest)" if x["is_latest"] else "")


def _probe_text(r: dict | None) -> str:
    if r is None:
        return "-"
    passed = {True: "passed", False: "FAILED"}.get(r.get("passed"), "not checked")
    return f"{json.dumps(r.get('answer'), ensure_ascii=False)}  {passed}"


def render(result: dict) -> str:
    a, b = result["a"], result["b"]
    rows = [("", _title(a), _title(b))] + [(label, _cell(a, key), _cell(b, key)) for label, key in ROWS]
    w0, w1 = (max(len(r[i]) for r in rows) for i in (0, 1))
    lines = [f"{r[0].ljust(w0)}  {r[1].ljust(w1)}  {r[2]}".rstrip() for r in rows]
    if result["same_standing_set"] is False:
        lines.append("note: the standing eval losses were measured on different standing sets (their sha256 "
                     "differ): they are not comparable")
    elif result["same_standing_set"] is None and (a["standing_eval_loss"] is not None
                                                  or b["standing_eval_loss"] is not None):
        lines.append("note: one version records no standing set: its standing eval loss cannot be compared")
    if result["probes"]:
        lines += ["", "probes:"]
        for n, p in enumerate(result["probes"], 1):
            checks = [f"expect {json.dumps(p['expect'], ensure_ascii=False)}" if p.get("expect") else "",
                      f"must not contain {json.dumps(p['must_not_contain'], ensure_ascii=False)}"
                      if p.get("must_not_contain") else "", "required" if p.get("required") else ""]
            shown = ", ".join(c for c in checks if c)
            lines.append(f"  {n}. {json.dumps(p['prompt'], ensure_ascii=False)}" + (f" ({shown})" if shown else ""))
            lines.append(f"     v{a['version']}: {_probe_text(p['a'])}")
            lines.append(f"     v{b['version']}: {_probe_text(p['b'])}")
    else:
        lines += ["", "probes: none recorded"]
    return "\n".join(for_terminal(line) for line in lines)


def compare_command(layout: Layout, spec_a: str, spec_b: str, as_json: bool) -> str:
    result = compare(layout, spec_a, spec_b)
    return json.dumps(result, indent=2, default=str) if as_json else render(result)

