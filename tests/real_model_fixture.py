"""One daemon-trained SmolLM2 adapter per session: the demo's fact, trained once, shared by the tests that need it.

The real daemon (`run --once`, a subprocess) trains the embedded SmolLM2-135M-Instruct on the demo's data and config
(examples/made_up_fact.jsonl, config/demo.yaml: the capital of the planet Zorblax is Quintara, 12 steps), exactly as
tests/test_real_model.py always did. That training is a minute or more of a 2-core runner, and
tests/test_real_model.py (the fact is learned) and tests/test_gguf_runtimes.py (the trained adapter answers the same
from GGUF) need the same one: `smollm2_fact` runs it once, on first use, and hands out its root and `run`'s result.

The root is shared: treat it as read-only, or take a copy (`copy_to`) to write in. Tests whose training differs
(tests/test_trust_real_model.py: another held-out split and required probes; tests/test_dpo_real_model.py:
preference pairs and DPO) train their own.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from daemon.paths import PROJECT_DIR
from helpers import cli, drop

FACT_DATA = PROJECT_DIR / "examples" / "made_up_fact.jsonl"
DEMO_CONFIG = PROJECT_DIR / "config" / "demo.yaml"


@dataclass(frozen=True)
class TrainedFact:
    root: Path  # the daemon root that trained it (inbox, queue, checkpoints/default/latest, status.log): read-only
    run: subprocess.CompletedProcess  # `run --once`'s result: a test asserts it succeeded before using the root

    def copy_to(self, dest: Path) -> Path:
        """A private copy of the whole root into dest (which may exist), links such as `latest` kept as links."""
        shutil.copytree(self.root, dest, symlinks=True, dirs_exist_ok=True)
        return dest


@pytest.fixture(scope="session")
def smollm2_fact(tmp_path_factory) -> TrainedFact:
    """The demo's fact trained by the real daemon on the embedded SmolLM2, once per session (see the module's doc).

    Only tests that skip without the converted embedded model may ask for it. A failed training is not raised here:
    each test asserts `run.returncode == 0` and shows the daemon's output."""
    root = tmp_path_factory.mktemp("smollm2-fact") / "root"
    root.mkdir()
    drop(root, FACT_DATA.name, FACT_DATA.read_bytes())
    run = cli(root, "run", "--once", "--config", str(DEMO_CONFIG), timeout=840)
    return TrainedFact(root, run)
