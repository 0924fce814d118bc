"""The systemd unit and logrotate config that install-service writes."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from daemon.supervisor import service
from daemon.paths import PROJECT_DIR, UserError


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """systemd's unit syntax: sections, repeatable keys, '#' comments (no continuation lines used)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"assignment outside a section: {raw!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not KEY=VALUE: {raw!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def one(unit, section, key):
    values = unit[section].get(key, [])
    assert len(values) == 1, (key, values)
    return values[0]


def systemd_verify(tmp: Path, text: str, scope: str) -> None:
    """systemd-analyze's own parser: any complaint about our file (unknown key, bad value) fails the test."""
    if not shutil.which("systemd-analyze"):
        return
    d = tmp / f"verify-{scope}"
    d.mkdir()
    (d / service.UNIT_NAME).write_text(text)
    runtime = tmp / "xdg-runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)
    user = ["--user"] if scope == "user" else []
    cmd = ["systemd-analyze", *user, "verify", "--man=no", str(d / service.UNIT_NAME)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, XDG_RUNTIME_DIR=str(runtime)))
    complaints = [line for line in (r.stdout + r.stderr).splitlines() if service.UNIT_NAME in line]
    assert not complaints, "\n".join(complaints)


def test_system_unit_has_the_service_contract(root):
    data = root / "data"
    data.mkdir()
    text = service.render_unit("system", data, user="alice")
    unit = parse_unit(text)
    s = unit["Service"]
    assert one(unit, "Service", "Type") == "notify"
    assert one(unit, "Service", "NotifyAccess") == "main"
    assert one(unit, "Service", "WatchdogSec") == "60s"
    assert one(unit, "Service", "Restart") == "on-failure"
    assert one(unit, "Service", "KillMode") == "mixed"
    assert one(unit, "Service", "KillSignal") == "SIGTERM"
    assert one(unit, "Service", "TimeoutStopSec") == "180s"
    # Room for the trainer's descriptors; the status page takes at most a quarter (web_server.connection_bound).
    assert one(unit, "Service", "LimitNOFILE") == "8192"
    assert one(unit, "Service", "User") == "alice"
    assert one(unit, "Service", "StateDirectory") == "training-daemon"
    exec_start = one(unit, "Service", "ExecStart").split()
    assert Path(exec_start[0]).is_absolute() and exec_start[0] == service.venv_python()
    assert exec_start[1] == str(PROJECT_DIR / "training_daemon.py") and exec_start[2] == "run"
    assert exec_start[exec_start.index("--root") + 1] == str(data)
    assert one(unit, "Service", "WorkingDirectory") == str(data)
    # Hardening that keeps the GPU and the HF cache reachable.
    for key, value in {"NoNewPrivileges": "yes", "PrivateTmp": "yes", "ProtectSystem": "strict",
                       "ProtectHome": "read-only", "DevicePolicy": "closed"}.items():
        assert one(unit, "Service", key) == value, key
    assert str(data) in s["ReadWritePaths"]
    assert any(v.startswith("char-nvidia-uvm") for v in s["DeviceAllow"])
    assert any(v.startswith("char-nvidiactl") for v in s["DeviceAllow"])
    hf_home = next(v.split("=", 1)[1] for v in s["Environment"] if v.startswith("HF_HOME="))
    assert "-" + hf_home in s["ReadWritePaths"]
    for forbidden in ("MemoryDenyWriteExecute", "PrivateDevices", "ProtectProc"):
        assert forbidden not in s, forbidden
    assert one(unit, "Install", "WantedBy") == "multi-user.target"
    systemd_verify(root, text, "system")


def test_system_unit_as_root_uses_a_dynamic_user_in_var_lib(root):
    text = service.render_unit("system", None, user="root")
    unit = parse_unit(text)
    assert one(unit, "Service", "DynamicUser") == "yes" and "User" not in unit["Service"]
    assert "--root /var/lib/training-daemon" in one(unit, "Service", "ExecStart")
    assert "HF_HOME=/var/lib/training-daemon/hf-cache" in unit["Service"]["Environment"]
    systemd_verify(root, text, "system")
    with pytest.raises(UserError, match="DynamicUser"):
        service.render_unit("system", root / "elsewhere", user="root")


def test_user_unit_leaves_out_what_an_unprivileged_systemd_cannot_do(root, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(root / "state-home"))
    text = service.render_unit("user", None)
    unit = parse_unit(text)
    assert "--root " + str(root / "state-home" / "training-daemon") in one(unit, "Service", "ExecStart")
    assert one(unit, "Service", "Type") == "notify" and one(unit, "Service", "NoNewPrivileges") == "yes"
    assert one(unit, "Service", "LimitNOFILE") == "8192"  # under a user manager's hard limit (524288)
    for absent in ("User", "DynamicUser", "ProtectSystem", "PrivateTmp", "DeviceAllow", "DevicePolicy"):
        assert absent not in unit["Service"], absent
    assert one(unit, "Install", "WantedBy") == "default.target"
    assert "@" not in text  # every placeholder was filled
    systemd_verify(root, text, "user")


def test_install_dry_run_prints_and_writes_nothing(root, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(root / "cfg"))
    out = service.install_service("user", root / "data", dry_run=True)
    print(out)
    first, _, unit_text = out.partition("\n")
    assert first == f"# {root / 'cfg' / 'systemd' / 'user' / service.UNIT_NAME}"
    assert parse_unit(unit_text)["Service"]["ExecStart"][0].endswith(f"run --root {root / 'data'}")
    assert not (root / "cfg").exists() and not (root / "data").exists()


def test_install_user_writes_the_unit_and_the_data_root(root, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(root / "cfg"))
    out = service.install_service("user", root / "data", dry_run=False, config=root / "daemon.yaml")
    unit_file = root / "cfg" / "systemd" / "user" / service.UNIT_NAME
    assert unit_file.exists() and (root / "data").is_dir()
    assert f"--config {root / 'daemon.yaml'}" in unit_file.read_text()
    assert "systemctl --user daemon-reload" in out and "enable --now training-daemon" in out
    assert "loginctl enable-linger" in out


def test_paths_systemd_would_split_are_refused(root):
    with pytest.raises(UserError, match="spaces"):
        service.render_unit("user", root / "my data")
    percent = service.render_unit("system", root / "100%", user="alice")
    assert f"--root {root}/100%%" in percent  # '%' escaped, so systemd does not read a specifier


def test_logrotate_config_rotates_the_logs_and_the_writer_follows(root):
    """Real logrotate over a real StatusWriter: the next event lands in a fresh status.log."""
    from daemon.paths import Layout
    from daemon.supervisor.status import StatusWriter

    text = service.render_logrotate("system", root)
    assert f"{root}/status.log {root}/events.jsonl {{" in text and "kill --kill-whom=main --signal=HUP" in text
    assert "copytruncate" not in text.replace("(no copytruncate)", "")
    if not shutil.which("logrotate"):
        pytest.skip("logrotate not installed")
    layout = Layout.at(root)
    writer = StatusWriter(layout, echo=False)
    writer.event("job_queued", "before rotation")
    conf = root / "logrotate.conf"
    # The postrotate script would signal systemd; here the writer must notice the new inode on its own.
    conf.write_text(text.replace("systemctl kill", "true"))
    r = subprocess.run(["logrotate", "--force", "--state", str(root / "logrotate.state"), str(conf)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert not layout.status_log.exists() and (root / "status.log.1").exists()
    writer.event("job_queued", "after rotation")
    assert "after rotation" in layout.status_log.read_text()
    assert "before rotation" in (root / "status.log.1").read_text()
    assert "after rotation" not in (root / "status.log.1").read_text()
    assert '"after rotation"' in layout.events.read_text()
