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
from torch._dynamo.utils import counters
from nested_learning.speed import compile_cache

def hits(digest):  # compile the same function as package version ``digest``: 1 if served from the disk cache
    compile_cache.source_digest = lambda root=None: digest
    compile_cache.tag_compile_caches()
    torch._dynamo.reset()  # forget the compiled frame: the next call looks the graph up in the cache again
    before = counters["inductor"].get("fxgraph_cache_hit", 0)
    torch.compile(lambda x: (x.sin() * 3 + 1).relu())(torch.randn(17))
    return counters["inductor"].get("fxgraph_cache_hit", 0) - before

print("HITS", *[hits(d) for d in sys.argv[1:]])
"""


def test_another_digest_misses_the_cache(tmp_path):
    """One process (a process per compile took 45 s on 2 cores): cold, the same version again (served from the
    on-disk cache), another version (compiled again), the first version once more (still there)."""
    env = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin",
           "PYTHONPATH": str(Path(compile_cache.__file__).parents[1])}
    digests = ["aaaaaaaaaaaaaaaa", "aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb", "aaaaaaaaaaaaaaaa"]
    out = subprocess.run([sys.executable, "-c", SCRIPT, *digests], env=env, capture_output=True, text=True,
                         timeout=300, check=True).stdout
    assert out.split("HITS")[-1].split() == ["0", "1", "0", "1"]
    assert any((tmp_path / "cache").rglob("*"))  # the graphs went to the cache directory given, not elsewhere
