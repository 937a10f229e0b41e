"""``bitsandbytes.functional`` of the stand-in: every attribute (``lib``, ``get_ptr``, ``dequantize_4bit``, ...) is
an inert placeholder that raises if called."""

from ._placeholder import placeholder_attribute

__getattr__ = placeholder_attribute(__name__)
