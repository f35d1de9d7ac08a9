"""``torchvision.ops.misc`` of the stand-in."""

from torchvision import Missing


class FrozenBatchNorm2d(Missing):
    pass
