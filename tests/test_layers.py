"""Imports follow the layers: the CLI's help and the service load no tensor library and no custom op; the
shared rules (ignore index, `--set` parser, period rule, model unwrapping) are defined once."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "nested_learning"
HEAVY = ("torch", "transformers", "peft", "mlx", "nested_learning.speed", "nested_learning.train.setup")


def _imported(code: str) -> set[str]:
    """Top-level module names imported by ``python -X importtime -c code`` (from its import-time trace)."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True, check=True)
    return {line.split("|")[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}


@pytest.mark.parametrize("code", [
    "import sys; sys.argv = ['nested-learning', '--help']\nfrom nested_learning.cli import main\ntry: main()\n"
    "except SystemExit: pass",
    "from nested_learning.service.app import create_app",
    # A whole server answering its pages, as `nested-learning serve` starts it.
    "import tempfile\nfrom pathlib import Path\nfrom fastapi.testclient import TestClient\n"
    "from nested_learning.service.app import create_app\nfrom nested_learning.service.jobs import Settings\n"
    "d = Path(tempfile.mkdtemp())\n"
    "with TestClient(create_app(Settings(db=str(d / 'j.db'), workdir=d, run_scheduler=False))) as c:\n"
    "    assert [c.get(u).status_code for u in ('/v1/jobs', '/', '/docs')] == [200, 200, 200]",
    "from nested_learning.train.state import Callback, TrainerState, TrainingError",
    "import nested_learning.tiers, nested_learning.config",
])
def test_entry_points_import_no_tensor_library(code):
    mods = _imported(code)
    assert {"nested_learning.config", "nested_learning.cli", "nested_learning.train.state"} & mods
    assert [m for m in mods if m.split(".")[0] in HEAVY or m in HEAVY or m.startswith(HEAVY[-2])] == []


def test_help_via_python_m_imports_no_torch():
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "nested_learning", "--help"],
                         capture_output=True, text=True)
    assert out.returncode == 0 and "train" in out.stdout
    assert not re.search(r"\|\s+torch(\.|$)", out.stderr, re.M)


def _definitions(pattern: str) -> list[str]:
    rx = re.compile(pattern, re.M)
    return sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if rx.search(p.read_text()))


@pytest.mark.parametrize("pattern, home", [
    (r"^IGNORE_INDEX\s*=", ["data/records.py"]),
    (r"^def apply_overrides\(", ["config/reading.py"]),
    (r"^def is_due\(", ["tiers.py"]),
    (r"_orig_mod", ["model/loading.py"]),
    (r"^def lr_lambda\(", ["optim/schedule.py"]),
])
def test_one_definition_each(pattern, home):
    assert _definitions(pattern) == home
