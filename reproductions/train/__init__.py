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
resume), :mod:`.engine` (the loop, logging, metrics), :mod:`.data`/:mod:`.transforms` (classification data),
:mod:`.seg_data`/:mod:`.metrics` (segmentation data and mIoU), :mod:`.summary` (tables of finished runs).

This package imports nothing on purpose: ``tocalib.reproductions.eval`` imports some of its modules, and an eager import
here would make the two import each other.
"""
