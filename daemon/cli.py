"""The `training-daemon` command (also `python training_daemon.py`)."""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import click

from daemon import __version__
from daemon.crash_report import DEBUG_ENV, one_line_error, traceback_hint
from daemon.paths import DEFAULT_ADAPTER, Layout, UserError, check_adapter_name, check_regular_file, check_root
from daemon.textsafe import for_terminal
from daemon.supervisor.job import JobStatus


def _load(root: str | None, config: str | None, need_config: bool = True):
    """The config and the root folder: --root, then $TRAINING_DAEMON_ROOT, then `root:` in the config, then '.'."""
    from daemon.config import default_config_path, load_config

    root = root or os.environ.get("TRAINING_DAEMON_ROOT")
    config = config or os.environ.get("TRAINING_DAEMON_CONFIG")
    path = Path(config) if config else default_config_path(Path(root) if root else Path.cwd())
    cfg = load_config(path, Path(root) if root else None) if need_config else None
    chosen = root or (cfg.root if cfg is not None and cfg.root else None) or "."
    return cfg, path, Layout.at(check_root(chosen))


def common(f):
    """--root and --config on every command, so they can follow the command name."""
    @click.option("--root", type=click.Path(file_okay=False), help="Data root (default: $TRAINING_DAEMON_ROOT, "
                  "the config's root:, or the current directory).")
    @click.option("--config", "config", type=click.Path(dir_okay=False), help="Daemon config YAML "
                  "(default: ROOT/config/daemon.yaml, else the shipped config/daemon.yaml).")
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        return f(*args, **kwargs)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="training-daemon")
def cli():
    """A local GPU LoRA training daemon: drop JSONL files into inbox/, get versioned adapters in checkpoints/."""


@cli.command()
@common
@click.option("--once", is_flag=True, help="Drain the inbox and the queue, then exit: 0 if every job succeeded.")
@click.option("--quiet", is_flag=True, help="Do not echo status lines to stdout.")
def run(root, config, once, quiet):
    """Run the daemon in the foreground (systemd runs this)."""
    from daemon.supervisor.loop import Supervisor

    cfg, path, layout = _load(root, config)
    sys.exit(Supervisor(layout, cfg, path, once=once, echo=not quiet).run())


@cli.command()
@common
@click.argument("file", type=click.Path())
@click.option("--adapter", default=DEFAULT_ADAPTER, show_default=True, help="Adapter to train.")
@click.option("--follow", is_flag=True, help="Show a live progress bar until the job ends; exit with its result.")
def submit(root, config, file, adapter, follow):
    """Copy FILE into the inbox atomically (the daemon takes it once it is complete)."""
    from daemon.supervisor.console import follow_job
    from daemon.supervisor.spool import Spool
    from daemon.supervisor.submit import submit_file, wait_for_job

    from daemon.config import ConfigError, IntakeConfig

    try:
        cfg, _, layout = _load(root, config)
        intake = cfg.intake
    except ConfigError as e:
        # Only the intake limits matter here: a config the daemon must fix (a base model not on this machine yet)
        # is no reason to refuse the file.
        _, _, layout = _load(root, config, need_config=False)
        intake = IntakeConfig()
        first = str(e).strip().splitlines()[0] if str(e).strip() else "invalid"
        click.echo(for_terminal(f"warning: the config could not be loaded ({first}); "
                                "submitting with the default intake limits"), err=True)
    dest, sha = submit_file(layout, Path(file), adapter, intake)
    click.echo(for_terminal(f"submitted {file} -> {dest} (sha256 {sha[:12]})"))
    if follow:
        sys.exit(follow_job(layout, wait_for_job(Spool(layout), dest.name, sha), sys.stdout))


@cli.command()
@common
@click.option("--json", "as_json", is_flag=True, help="Print status.json.")
def status(root, config, as_json):
    """Show the daemon's state, the current job and the queue."""
    from daemon.durable import read_json
    from daemon.supervisor.console import render_status
    from daemon.supervisor.control import daemon_pid
    from daemon.version_states import summary

    _, _, layout = _load(root, config, need_config=False)
    snap = read_json(layout.status_json) or {}
    snap.setdefault("daemon", {})["running"] = daemon_pid(layout) is not None
    snap["adapters"] = summary(layout.checkpoints)  # latest, newest and held versions, read from checkpoints/
    if as_json:
        click.echo(json.dumps(snap, indent=2))
    else:
        click.echo(render_status(snap, _jobs(layout)))


@cli.command()
@common
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--state", type=click.Choice([s.value for s in JobStatus]), help="Only jobs in this state.")
def jobs(root, config, as_json, state):
    """List jobs: id, file, adapter, state, version, error."""
    from daemon.supervisor.console import render_jobs

    _, _, layout = _load(root, config, need_config=False)
    rows = _jobs(layout, state)
    click.echo(json.dumps(rows, indent=2) if as_json else render_jobs(rows))


def _jobs(layout: Layout, state: str | None = None) -> list[dict]:
    from daemon.supervisor.spool import Spool

    from daemon.version_states import annotate_jobs

    return annotate_jobs(layout.checkpoints, [job.to_dict() for job, _ in Spool(layout).list(state)])


@cli.command()
@common
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--adapter", default=DEFAULT_ADAPTER, help="Validate with this adapter's config overrides.")
@click.option("--show", type=click.IntRange(min=1), metavar="N",
              help="Also print line N as the model sees it, the trained tokens marked ⟦like this⟧.")
def validate(root, config, file, as_json, adapter, show):
    """Check FILE as the daemon would (formats, per-line errors, token counts) without training."""
    from daemon.config import adapter_config
    from daemon.trainer.data import validate_command

    check_regular_file(file, "data file")  # before anything is opened: /dev/zero never ends, a FIFO blocks
    cfg, path, _ = _load(root, config)
    sys.exit(validate_command(Path(file), adapter_config(cfg, check_adapter_name(adapter), path), as_json, show))


@cli.group("config")
def config_group():
    """Inspect the configuration."""


@config_group.command("check")
@common
def config_check(root, config):
    """Print the effective config, or every error in it (exit 2)."""
    from daemon.config import config_check_command

    sys.exit(config_check_command(Path(config) if config else None, Path(root) if root else None))


@cli.command()
@common
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines (survives log rotation).")
@click.option("-n", "--lines", default=20, show_default=True, help="How many earlier lines to show.")
def logs(root, config, follow, lines):
    """Show status.log."""
    from daemon.supervisor.console import follow_log

    _, _, layout = _load(root, config, need_config=False)
    if follow:
        try:
            for line in follow_log(layout.status_log, lines=lines):
                click.echo(line)
        except KeyboardInterrupt:
            return
    else:
        from daemon.supervisor.console import last_log_lines

        click.echo("\n".join(last_log_lines(layout.status_log, lines)))


def _control(root, config, action, job_id=None, same_config=False):
    from daemon.supervisor import control

    _, path, layout = _load(root, config, need_config=False)
    layout.ensure()
    root = root or os.environ.get("TRAINING_DAEMON_ROOT")
    # The config a retried job takes, read as the daemon reads it: the same file, the same root override.
    current = control.current_config(path, root)
    # Applied here under the daemon's lock when no daemon runs, else checked now and requested (control.command).
    msg = control.command(layout, action, job_id, current=current, same_config=same_config)
    click.echo(msg)


@cli.command()
@common
def pause(root, config):
    """Stop starting jobs; a running job checkpoints and goes back to pending."""
    _control(root, config, "pause")


@cli.command()
@common
def resume(root, config):
    """Undo pause."""
    _control(root, config, "resume")


@cli.command()
@common
@click.argument("job_id", type=int)
def cancel(root, config, job_id):
    """Cancel a pending or running job (it ends in failed, its input kept)."""
    _control(root, config, "cancel", job_id)


@cli.command()
@common
@click.argument("job_id", type=int)
@click.option("--same-config", is_flag=True, help="Keep the job's config snapshot instead of taking the current "
              "config (config file and adapter override as they are now).")
def retry(root, config, job_id, same_config):
    """Queue a failed job again, with the current config (or its old one: --same-config)."""
    _control(root, config, "retry", job_id, same_config)


@cli.command()
@common
@click.argument("spec", metavar="ADAPTER@VERSION")
def promote(root, config, spec):
    """Make ADAPTER@VERSION `latest` by hand (a version the promotion gate held, or an older one), atomically;
    it must be whole and trained on the same base model. Works with or without a running daemon."""
    from daemon.supervisor.latest_commands import promote as promote_version
    from daemon.trainer.generate import check_same_base

    _, _, layout = _load(root, config, need_config=False)
    click.echo(for_terminal(promote_version(layout, spec, check_same_base)))


@cli.command()
@common
@click.argument("adapter")
def rollback(root, config, adapter):
    """Move ADAPTER's `latest` back to the version that was latest before it (skipping any damaged since)."""
    from daemon.supervisor.latest_commands import rollback as roll_back

    _, _, layout = _load(root, config, need_config=False)
    click.echo(for_terminal(roll_back(layout, adapter)))


@cli.command()
@common
@click.argument("spec_a", metavar="ADAPTER@VERSION")
@click.argument("spec_b", metavar="ADAPTER@VERSION")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def compare(root, config, spec_a, spec_b, as_json):
    """Two versions side by side from their metadata (no model is loaded): source, job, the gate's decision,
    standing and own eval loss, and each probe's answers."""
    from daemon.supervisor.compare import compare_command

    _, _, layout = _load(root, config, need_config=False)
    click.echo(compare_command(layout, spec_a, spec_b, as_json))


@cli.command()
@common
@click.argument("spec", metavar="ADAPTER[@VERSION]")
@click.option("--merge", "merge_out", type=click.Path(), help="Write a merged full model (safetensors) to this folder.")
@click.option("--gguf", "gguf_out", type=click.Path(), help="Write the merged model as one GGUF file, with an Ollama "
              "Modelfile, to this folder (llama.cpp, Ollama; llama and qwen2 models).")
@click.option("--quant", type=click.Choice(["f16", "bf16", "q8_0"]), help="GGUF weight type (default f16).")
@click.option("--lora", "lora", is_flag=True, help="With --gguf: the base model and the adapter as two GGUF files "
              "(llama.cpp --lora, Ollama ADAPTER) instead of one merged file.")
def export(root, config, spec, merge_out, gguf_out, quant, lora):
    """Merge an adapter version into its base model and save the full model (--merge), or a GGUF file for
    llama.cpp and Ollama (--gguf)."""
    if bool(merge_out) == bool(gguf_out):
        raise UserError("choose one of --merge OUT or --gguf OUT")
    if (quant or lora) and not gguf_out:
        raise UserError(f"{'--quant' if quant else '--lora'} goes with --gguf")
    _, _, layout = _load(root, config, need_config=False)
    if gguf_out:
        from daemon.trainer.gguf_export import export_gguf

        path = export_gguf(layout, spec, Path(gguf_out), quant or "f16", lora)
        click.echo(for_terminal(f"GGUF written to {path} (Modelfile beside it)"))
        return
    from daemon.trainer.export import export_merged

    click.echo(for_terminal(f"merged model written to {export_merged(layout, spec, Path(merge_out))}"))


@cli.command("install-service")
@common
@click.option("--user", "scope", flag_value="user", help="Install as a user service (~/.config/systemd/user).")
@click.option("--system", "scope", flag_value="system", help="Install as a system service (needs root).")
@click.option("--dry-run", is_flag=True, help="Print the unit instead of writing it.")
def install_service(root, config, scope, dry_run):
    """Write a systemd unit for this daemon."""
    from daemon.supervisor.service import install_service as install

    if not scope:
        raise UserError("choose --user or --system")
    click.echo(install(scope, Path(root).resolve() if root else None, dry_run))


@cli.command()
@common
@click.argument("question")
@click.option("--adapter", "spec", metavar="ADAPTER[@VERSION]", help="Use this adapter version (default: the base).")
@click.option("--max-new-tokens", default=48, show_default=True)
def ask(root, config, question, spec, max_new_tokens):
    """Ask the base model, or an adapter version, one question (greedy decoding)."""
    from daemon.base_model import resolve_base_model
    from daemon.trainer.generate import answer, load, resolve_version

    cfg, _, layout = _load(root, config)
    if spec:
        path, meta = resolve_version(layout.checkpoints, spec)
        model, tok = load(Path(meta["base_model_path"]), path, cfg.trust_remote_code)
    else:
        model, tok = load(resolve_base_model(cfg.base_model), trust_remote_code=cfg.trust_remote_code)
    click.echo(answer(model, tok, question, max_new_tokens))


def main(argv=None) -> None:
    from daemon.durable import forbid_world_writable

    forbid_world_writable()  # the control commands write into the root too
    try:
        cli.main(args=argv, prog_name="training-daemon", standalone_mode=False)
    except UserError as e:
        click.echo("\n".join(for_terminal(line) for line in f"Error: {e}".split("\n")), err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except SystemExit:
        raise
    except Exception as e:  # noqa: BLE001 - a bug or an unforeseen OS error: one line, the traceback kept aside
        if os.environ.get(DEBUG_ENV):
            raise
        click.echo(for_terminal(f"Error: {one_line_error(e)} ({traceback_hint(e)})"), err=True)
        sys.exit(1)

