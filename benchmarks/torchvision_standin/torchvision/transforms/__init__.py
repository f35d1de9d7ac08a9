"""``torchvision.transforms`` of the stand-in."""

from torchvision import Missing
from torchvision.transforms import functional
from torchvision.transforms.functional import InterpolationMode

__all__ = ["InterpolationMode", "ToTensor", "functional"]


class ToTensor(Missing):
    pass
