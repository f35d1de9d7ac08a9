"""``torchvision.ops`` of the stand-in."""
