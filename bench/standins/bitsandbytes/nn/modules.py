"""``bitsandbytes.nn.modules`` of the stand-in: the layer and parameter classes loaders name in ``isinstance``
checks."""

import torch

from .._placeholder import Unbuildable, placeholder_attribute


class Linear4bit(Unbuildable, torch.nn.Linear):
    pass


class LinearFP4(Linear4bit):
    pass


class LinearNF4(Linear4bit):
    pass


class Linear8bitLt(Unbuildable, torch.nn.Linear):
    pass


class Embedding4bit(Unbuildable, torch.nn.Embedding):
    pass


class Params4bit(Unbuildable, torch.nn.Parameter):
    pass


class Int8Params(Unbuildable, torch.nn.Parameter):
    pass


__getattr__ = placeholder_attribute(__name__)
