"""Keep torch's on-disk compile caches from serving graphs built against another version of this package.

Inductor's caches key on the traced graph, torch's version and its config, not on the code behind the custom ops
a graph calls (``nested_learning::lora_fold`` and the others): a changed fake impl or kernel with an unchanged
schema would be served the graph compiled against the old one. Every entry point that compiles first puts a
digest of the package's source into ``torch.compiler.config.cache_key_tag``, after any tag the user set
(``TORCH_COMPILE_CACHE_KEY_TAG``), so a new version compiles once and then hits its own cache.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]  # the whole nested_learning package
PREFIX = "nested_learning-"


@functools.cache
def source_digest(root: Path = PACKAGE) -> str:
    """First 16 hex digits of the SHA-256 over every ``*.py`` under ``root`` (relative path and bytes, sorted)."""
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def tag_compile_caches() -> str | None:
    """Add this package's digest to torch's cache key tag (idempotent); returns the tag, or ``None`` on a torch
    without ``torch.compiler.config.cache_key_tag``."""
    try:
        import torch.compiler.config as config
    except ImportError:  # pragma: no cover - older torch
        return None
    if not hasattr(config, "cache_key_tag"):  # pragma: no cover - older torch
        return None
    ours = PREFIX + source_digest()
    parts = [p for p in config.cache_key_tag.split("+") if p and not p.startswith(PREFIX)]
    config.cache_key_tag = "+".join([*parts, ours])
    return config.cache_key_tag
