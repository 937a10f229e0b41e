"""A stand-in for ``bitsandbytes``, for the Unsloth variants of ``bench/peers.py`` only.

Unsloth's loader imports ``bitsandbytes.nn.Linear4bit`` (and reads ``bitsandbytes.functional``) even for 16-bit
LoRA, where it never calls them; the real package is too large to travel to the benchmark machine. ``peers.py``
puts ``bench/standins`` on ``PYTHONPATH`` for the Unsloth worker processes alone; nothing else, the library
included, can import it. Every class here refuses to be built and every function placeholder refuses to be
called, so a 4-bit path that reached one would fail loudly instead of computing something: a 16-bit run either
never touches the stand-in or stops. ``bench/peers.py`` also checks Unsloth's losses against PEFT's.

``__version__`` is below transformers' minimum (0.46.1), so transformers reports bitsandbytes as unavailable;
accelerate finds no installed distribution and says the same; PEFT imports it but matches no layer against its
classes (an ``nn.Linear`` is never an instance of them).
"""

from . import functional, nn  # noqa: F401
from ._placeholder import STANDIN, placeholder_attribute

__version__ = "0.45.5"
IS_BENCH_STANDIN = STANDIN

__getattr__ = placeholder_attribute(__name__)
