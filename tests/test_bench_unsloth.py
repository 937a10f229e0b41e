"""The Unsloth variants' side of ``bench/peers.py`` that runs without a GPU: the ``bitsandbytes`` stand-in changes
nothing transformers, accelerate or PEFT compute and refuses any real use; only the Unsloth workers get it on their
path; the same-math report compares step losses."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import peers_unsloth  # noqa: E402
from peers_report import loss_agreement  # noqa: E402

PROBE = r"""
import json, torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.utils import is_bitsandbytes_available
from accelerate.utils import is_bnb_available
torch.manual_seed(0)
base = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, use_cache=False))
model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
ids = torch.arange(12).view(1, 12)
out = {"loss": model(input_ids=ids, labels=ids).loss.item(), "transformers": is_bitsandbytes_available(),
       "accelerate": is_bnb_available(), "layers": sorted({type(m).__module__ + "." + type(m).__name__
       for n, m in model.named_modules() if n.endswith(("q_proj", "down_proj"))})}
try:
    import bitsandbytes as bnb
    out["stand_in"] = bool(getattr(bnb, "IS_BENCH_STANDIN", False))
    refused = []
    for call in (lambda: bnb.functional.dequantize_4bit(ids), lambda: bnb.functional.lib.cdequantize_blockwise_fp32(),
                 lambda: bnb.nn.Linear4bit(4, 4), lambda: bnb.matmul_4bit(ids, ids)):
        try:
            call()
        except RuntimeError as e:
            refused.append("stand-in" in str(e))
    out["refused"] = refused
    out["falsy"] = not bnb.functional.get_ptr
except ImportError:
    out["stand_in"] = None
print("PROBE " + json.dumps(out))
"""


def _probe(with_standin: bool) -> dict:
    env = dict(os.environ)
    if with_standin:
        env = peers_unsloth.worker_env({**env, "PEERS_UNSLOTH_PATH": ""})
    proc = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=180)
    line = [x for x in proc.stdout.splitlines() if x.startswith("PROBE ")]
    assert line, proc.stderr[-2000:]
    return json.loads(line[-1][6:])


def test_standin_changes_nothing_and_refuses_real_use():
    plain, standin = _probe(False), _probe(True)
    assert standin["stand_in"] is True and plain["stand_in"] is not True
    assert standin["loss"] == plain["loss"]
    assert standin["layers"] == plain["layers"] == ["peft.tuners.lora.layer.Linear"]
    assert standin["transformers"] is False and standin["accelerate"] is False
    assert standin["refused"] == [True] * 4 and standin["falsy"]


def test_only_the_unsloth_workers_get_the_standin_on_their_path(tmp_path):
    env = peers_unsloth.worker_env({"PYTHONPATH": "/x/site", "PEERS_UNSLOTH_PATH": str(tmp_path)})
    assert env["PYTHONPATH"].split(os.pathsep) == [str(ROOT / "bench" / "standins"), str(tmp_path), "/x/site"]
    assert env["HF_HUB_OFFLINE"] == "1" and env["UNSLOTH_DISABLE_STATISTICS"] == "1"
    # The library's own processes never see it: the stand-in lives outside the package and the test path.
    import importlib.util

    spec = importlib.util.find_spec("bitsandbytes")
    assert spec is None or "standins" not in str(spec.origin)
    peers = (ROOT / "bench" / "peers.py").read_text()
    assert "own_env = peers_unsloth.worker_env(env) if spec[\"variant\"] in peers_unsloth.VARIANTS else env" in peers


@pytest.mark.parametrize("unsloth_losses, want", [([2.0, 1.5, 1.25], "3 steps: max |loss difference| 5.00e-04"),
                                                  ([2.0, 1.5], "2 steps: max |loss difference| 5.00e-04")])
def test_same_math_report_compares_step_losses(unsloth_losses, want):
    runs = [{"shape": "llama1b", "data": "fixed", "variant": "peft_adamw", "losses": [2.0, 1.5005, 1.25]},
            {"shape": "llama1b", "data": "fixed", "variant": "peer_unsloth", "losses": unsloth_losses},
            {"shape": "llama1b", "data": "fixed", "variant": "peft_compile", "error": "timeout"}]
    lines = loss_agreement(runs)
    assert len(lines) == 1 and "llama1b fixed peer_unsloth vs peft_adamw" in lines[0] and want in lines[0]
