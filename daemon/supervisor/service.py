"""Install the daemon as a systemd service: render config/training-daemon.service and write it.

--system: /etc/systemd/system, data in /var/lib/training-daemon, full sandboxing, run as the user who
invoked sudo (their Hugging Face cache stays usable) or, when that is root, as a DynamicUser.
--user: ~/.config/systemd/user, data in ~/.local/state/training-daemon, only the hardening an
unprivileged systemd can apply (no mount namespaces, no device cgroup).
"""

from __future__ import annotations

import getpass
import os
import pwd
import re
import sys
from pathlib import Path

from daemon import durable
from daemon.paths import PROJECT_DIR, UserError

UNIT_NAME = "training-daemon.service"
UNIT_TEMPLATE = PROJECT_DIR / "config" / "training-daemon.service"
LOGROTATE_TEMPLATE = PROJECT_DIR / "config" / "logrotate.conf"
SYSTEM_ROOT = Path("/var/lib/training-daemon")
SCOPES = ("user", "system")
# systemd splits these directives on whitespace and treats quotes and backslashes specially; rather
# than escape a path for each directive's rules, refuse the few characters that would need it.
_UNSAFE = re.compile(r"[\s\"'\\;]")


def _home() -> Path:
    return Path(os.environ.get("HOME") or pwd.getpwuid(os.getuid()).pw_dir)


def default_root(scope: str) -> Path:
    """Where StateDirectory=training-daemon points for this scope (systemd >= 247 for --user)."""
    if scope == "system":
        return SYSTEM_ROOT
    return Path(os.environ.get("XDG_STATE_HOME") or _home() / ".local" / "state") / "training-daemon"


def unit_path(scope: str) -> Path:
    if scope == "system":
        return Path("/etc/systemd/system") / UNIT_NAME
    return Path(os.environ.get("XDG_CONFIG_HOME") or _home() / ".config") / "systemd" / "user" / UNIT_NAME


def venv_python() -> str:
    """The project's venv interpreter, unresolved: resolving the symlink would leave the venv."""
    venv = PROJECT_DIR / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def service_user(scope: str, user: str | None = None) -> str | None:
    """Who a --system service runs as: --user-name, else whoever ran sudo; None means DynamicUser."""
    if scope != "system":
        return None
    name = user or os.environ.get("SUDO_USER") or getpass.getuser()
    return None if name == "root" else name


def _hf_home(scope: str, user: str | None, root: Path) -> Path:
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"])
    if scope == "system" and user is None:
        return root / "hf-cache"  # a DynamicUser has no home of its own
    try:
        home = Path(pwd.getpwnam(user).pw_dir) if user else _home()
    except KeyError:
        home = _home()
    return home / ".cache" / "huggingface"


def _check_path(what: str, path: Path | str) -> str:
    text = str(path)
    if _UNSAFE.search(text):
        raise UserError(f"{what} {text!r} contains spaces, quotes, backslashes or ';'; "
                        "systemd unit lines need a simpler path")
    return text.replace("%", "%%")  # '%' starts a systemd specifier


def render_unit(scope: str, root: Path | None = None, *, python: str | None = None, user: str | None = None,
                config: Path | None = None) -> str:
    if scope not in SCOPES:
        raise UserError(f"scope must be 'user' or 'system', not {scope!r}")
    root = Path(root) if root else default_root(scope)
    if not root.is_absolute():
        raise UserError(f"the data root must be an absolute path, not {root}")
    run_as = service_user(scope, user)
    if scope == "system" and run_as is None and root != SYSTEM_ROOT:
        # A DynamicUser's uid is allocated at start: it can own only the StateDirectory systemd makes for it.
        raise UserError(f"as root, --system runs the daemon as a DynamicUser whose data lives in {SYSTEM_ROOT}; "
                        "to use another root, install it to run as a named user (sudo -u NAME or user=NAME)")
    args = [python or venv_python(), str(PROJECT_DIR / "training_daemon.py"), "run", "--root", str(root)]
    if config:
        args += ["--config", str(Path(config).resolve())]
    exec_start = " ".join(_check_path("path", a) for a in args)
    values = {
        "@EXEC_START@": exec_start,
        "@ROOT@": _check_path("data root", root),
        "@PROJECT@": _check_path("project folder", PROJECT_DIR),
        "@HF_HOME@": _check_path("HF_HOME", _hf_home(scope, run_as, root)),
        "@IDENTITY@": f"User={run_as}" if run_as else "DynamicUser=yes",
        # StateDirectory= is writable already; a DynamicUser's is a symlink into /var/lib/private.
        "@RW_ROOT@": None if root == default_root(scope) else _check_path("data root", root),
        "@WANTED_BY@": "multi-user.target" if scope == "system" else "default.target",
    }
    template = UNIT_TEMPLATE.read_text().splitlines()
    while template and template[0].startswith("#"):  # the template's own header, about placeholders
        template.pop(0)
    lines = [f"# {UNIT_NAME}: written by `training-daemon install-service --{scope}` from",
             f"# {UNIT_TEMPLATE}; see {PROJECT_DIR / 'docs' / 'operations.md'}."]
    for line in template:
        if line.startswith("@SYSTEM@"):
            if scope != "system":
                continue
            line = line[len("@SYSTEM@"):]
        if any(key in line and value is None for key, value in values.items()):
            continue  # a line that does not apply here
        for key, value in values.items():
            line = line.replace(key, value or "")
        lines.append(line)
    return "\n".join(lines) + "\n"


def render_logrotate(scope: str, root: Path | None = None) -> str:
    root = Path(root) if root else default_root(scope)
    systemctl = "systemctl" if scope == "system" else "systemctl --user"
    text = LOGROTATE_TEMPLATE.read_text()
    return text.replace("@ROOT@", _check_path("data root", root)).replace("@SYSTEMCTL@", systemctl)


def install_service(scope: str, root: Path | None = None, dry_run: bool = False, *, user: str | None = None,
                    config: Path | None = None) -> str:
    """Write the unit (and, for --system, /etc/logrotate.d/training-daemon); return what to tell the person.

    With dry_run, return the unit text instead, headed by the path it would be written to.
    """
    unit = render_unit(scope, root, user=user, config=config)
    target = unit_path(scope)
    if dry_run:
        return f"# {target}\n{unit}"
    root = Path(root) if root else default_root(scope)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        durable.write_text(target, unit)
    except PermissionError:
        raise UserError(f"cannot write {target}: --system needs root (sudo training-daemon install-service "
                        "--system)") from None
    notes = [f"wrote {target}"]
    if scope == "system":
        logrotate_dir = Path("/etc/logrotate.d")
        if logrotate_dir.is_dir():
            durable.write_text(logrotate_dir / "training-daemon", render_logrotate(scope, root))
            notes.append(f"wrote {logrotate_dir / 'training-daemon'}")
    else:
        root.mkdir(parents=True, exist_ok=True)
    ctl = "systemctl" if scope == "system" else "systemctl --user"
    journal = "journalctl" if scope == "system" else "journalctl --user"
    notes += ["next:", f"  {ctl} daemon-reload", f"  {ctl} enable --now training-daemon",
              f"  {ctl} status training-daemon        # STATUS= line shows the current job",
              f"  {journal} -u training-daemon -f"]
    if scope == "user":
        notes.append(f"  loginctl enable-linger {getpass.getuser()}   # keep it running after you log out")
    notes.append(f"data root: {root}")
    return "\n".join(notes)
