"""What each adapter's versions are to `latest`, for the listings (`jobs`, `status`, the status page, /metrics):
which one is latest, which is newest, which the promotion gate held and nobody promoted since. Read-only, from
latest.json (daemon/promotion.py) and each version's metadata.json; no torch."""

from __future__ import annotations

from pathlib import Path

from daemon import versions as v
from daemon.promotion import gate_verdict, metadata_summary, promoted, read_record


def adapter_state(adapter_dir: Path) -> dict:
    """{"latest", "newest", "held": [versions the gate held and nobody promoted since], "decisions": {version:
    gate_verdict}, "history": the record's last entries} of one adapter."""
    adapter_dir = Path(adapter_dir)
    rec = read_record(adapter_dir)
    found = v.versions(adapter_dir)
    ever_latest = {e["version"] for e in rec["history"]} if rec else set(found)
    decisions = {}
    for version in found:
        meta = metadata_summary(adapter_dir, version)
        if meta is not None:
            decisions[version] = {**gate_verdict(meta), "promoted_later": version in ever_latest}
    latest = promoted(adapter_dir)
    held = [n for n, d in decisions.items() if d["decision"] == "held" and n not in ever_latest and n != latest]
    return {"latest": latest, "newest": found[-1] if found else None, "held": held, "decisions": decisions,
            "history": (rec or {}).get("history", [])[-20:]}


def label(state: dict, version: int) -> str:
    """A job's version as `jobs` shows it: "v5", or "v5 (held: latest stays v4)"."""
    d = state["decisions"].get(version)
    if not d or d["decision"] != "held":
        return f"v{version}"
    if d["promoted_later"] or state["latest"] == version:
        return f"v{version} (held, promoted by hand)"
    stays = d["latest_after"] if d["latest_after"] is not None else state["latest"]
    return f"v{version} (held: latest stays {'v' + str(stays) if stays is not None else 'none'})"


def adapter_dirs(checkpoints: Path) -> list[Path]:
    from daemon.paths import ADAPTER_NAME

    checkpoints = Path(checkpoints)
    if not checkpoints.is_dir():
        return []
    return [d for d in sorted(checkpoints.iterdir()) if d.is_dir() and ADAPTER_NAME.match(d.name)]


def summary(checkpoints: Path) -> dict[str, dict]:
    """{adapter: {"latest", "newest", "held"}}: what `status --json` and the page show per adapter."""
    out = {}
    for adapter_dir in adapter_dirs(checkpoints):
        state = adapter_state(adapter_dir)
        out[adapter_dir.name] = {k: state[k] for k in ("latest", "newest", "held")}
    return out


def annotate_jobs(checkpoints: Path, rows: list[dict]) -> list[dict]:
    """Each done job's row (a job.json dict) with "promotion": its version's gate verdict and the label `jobs`
    shows ("v5 (held: latest stays v4)"); rows of jobs without a version, or whose version is gone, unchanged."""
    states: dict[str, dict] = {}
    for row in rows:
        adapter, version = row.get("adapter"), row.get("version")
        whole = isinstance(version, int) and not isinstance(version, bool)
        if row.get("state") != "done" or not whole or not isinstance(adapter, str):
            continue
        adapter_dir = Path(checkpoints) / adapter
        if adapter not in states:
            states[adapter] = adapter_state(adapter_dir) if adapter_dir.is_dir() else {"decisions": {}}
        d = states[adapter]["decisions"].get(version)
        if d is not None:
            row["promotion"] = {"decision": d["decision"], "reason": d["reason"], "latest_after": d["latest_after"],
                                "label": label(states[adapter], version)}
    return rows


def page_view(checkpoints: Path) -> list[dict]:
    """/api/adapters: per adapter its latest, newest and held versions, the record's last moves, and the newest
    version's judgement: the gate's verdict and each probe's answer beside the incumbent's."""
    out = []
    for adapter_dir in adapter_dirs(checkpoints):
        state = adapter_state(adapter_dir)
        row = {"adapter": adapter_dir.name, **{k: state[k] for k in ("latest", "newest", "held", "history")},
               "newest_judgement": None}
        newest = state["newest"]
        meta = metadata_summary(adapter_dir, newest) if newest is not None else None
        if meta is not None:
            j = meta.get("judgement") if isinstance(meta.get("judgement"), dict) else {}
            incumbent = j.get("incumbent") if isinstance(j.get("incumbent"), dict) else {}
            row["newest_judgement"] = {
                "version": newest, **{k: state["decisions"][newest][k] for k in ("decision", "reason", "judged")},
                "incumbent_version": incumbent.get("version"),
                "probes": [{k: p.get(k) for k in ("prompt", "expect", "must_not_contain", "required", "answer",
                                                  "passed", "incumbent_answer", "incumbent_passed")}
                           for p in j.get("probes") or [] if isinstance(p, dict)]}
        out.append(row)
    return out
