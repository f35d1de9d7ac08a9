"""``torchvision.datasets`` of the stand-in."""

from torchvision import Missing


class CIFAR10(Missing):
    pass


class CIFAR100(Missing):
    pass


class MNIST(Missing):
    pass


class KMNIST(Missing):
    pass


class FashionMNIST(Missing):
    pass


class ImageFolder(Missing):
    pass
