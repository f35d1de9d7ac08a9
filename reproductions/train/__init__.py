"""Training and evaluation pipelines on PyTorch's own distributed engine (torchrun + DistributedDataParallel).

Entry points, each runnable alone or under ``torchrun --nproc_per_node N``:

* ``tocalib-train-classification`` (``python -m tocalib.reproductions.train.classification``): the ImageNet-1k
  recipe of the paper (PaCaViT@4307018 imagenet_vit_adamw.yml) on an ImageFolder tree, or the Fashion-MNIST
  preset (``--preset fashion_mnist``);
* ``tocalib-train-segmentation`` (``python -m tocalib.reproductions.train.segmentation``): the ADE20k recipe
  (PaCaViT@4307018 segmentation configs) for the PaCa head and UperNet, or the scikit-image texture preset
  (``--preset textures``).

The pieces: :mod:`.config` (dataclass configs and their command lines), :mod:`.distributed` (process group,
samplers), :mod:`.optim` (parameter groups, lr rules and schedules), :mod:`.checkpoint` (save and exact
resume), :mod:`.engine` (the loop, logging, metrics), :mod:`.summary` (tables of finished runs). Datasets and
augmentations come from :mod:`tocalib.reproductions.data`, accuracy and mIoU from :mod:`tocalib.reproductions.metrics`,
which the evaluation (:mod:`tocalib.reproductions.eval`) reads too; ``train`` and ``eval`` never import each other.

This package imports nothing eagerly, so that ``import tocalib.reproductions.train.summary`` needs no torch DDP setup.
"""
