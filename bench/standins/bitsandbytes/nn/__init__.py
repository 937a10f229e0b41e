"""``bitsandbytes.nn`` of the stand-in."""

from .._placeholder import placeholder_attribute
from .modules import Embedding4bit, Int8Params, Linear4bit, Linear8bitLt, LinearFP4, LinearNF4, Params4bit  # noqa: F401

__getattr__ = placeholder_attribute(__name__)
