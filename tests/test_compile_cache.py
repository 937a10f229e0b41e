"""Compiled graphs cached on disk by one version of the package are not served to another."""

import shutil
import subprocess
import sys
from pathlib import Path

import torch

from nested_learning.speed import compile_cache
from nested_learning.speed.compile_cache import PACKAGE, source_digest, tag_compile_caches


def test_digest_follows_the_source(tmp_path):
    root = tmp_path / "pkg"
    shutil.copytree(PACKAGE, root, ignore=shutil.ignore_patterns("__pycache__"))
    before = source_digest(root)
    assert before == source_digest.__wrapped__(PACKAGE)  # a copy of the same files: the same digest
    fold = root / "speed" / "lora_fold.py"
    fold.write_text(fold.read_text() + "\n# changed\n")
    assert source_digest.__wrapped__(root) != before


def test_tag_keeps_the_users_tag_and_is_idempotent():
    config = torch.compiler.config
    before = config.cache_key_tag
    with config.patch(cache_key_tag="team-a"):  # patch(): torch's config modules do not survive monkeypatch
        tag = tag_compile_caches()
        assert tag == f"team-a+nested_learning-{source_digest()}"
        assert tag_compile_caches() == tag
    with config.patch(cache_key_tag="nested_learning-0123456789abcdef+team-a"):
        # A digest from another version (set in a long-lived process before an upgrade) is replaced.
        assert tag_compile_caches() == tag
    assert config.cache_key_tag == before  # restored


SCRIPT = """
import sys, torch
from nested_learning.speed import compile_cache
compile_cache.source_digest = lambda root=None: sys.argv[1]
compile_cache.tag_compile_caches()
torch.compile(lambda x: (x.sin() * 3 + 1).relu())(torch.randn(17))
from torch._dynamo.utils import counters
print("HITS", counters["inductor"].get("fxgraph_cache_hit", 0))
"""


def test_another_digest_misses_the_cache(tmp_path):
    env = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin",
           "PYTHONPATH": str(Path(compile_cache.__file__).parents[1])}

    def hits(digest):
        out = subprocess.run([sys.executable, "-c", SCRIPT, digest], env=env, capture_output=True, text=True,
                             timeout=300, check=True).stdout
        return int(out.split("HITS")[-1])

    assert hits("aaaaaaaaaaaaaaaa") == 0  # cold
    assert hits("aaaaaaaaaaaaaaaa") == 1  # same version: served from disk
    assert hits("bbbbbbbbbbbbbbbb") == 0  # another version: compiled again
