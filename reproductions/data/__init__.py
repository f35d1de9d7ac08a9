"""Datasets, readers and augmentations that the evaluation (:mod:`tocalib.reproductions.eval`) and the training
(:mod:`tocalib.reproductions.train`) both use; neither of those two imports the other.

* :mod:`.folders`: the ImageNet class-folder tree and Fashion-MNIST's IDX files;
* :mod:`.images`: image reading and mmcv's keep-ratio resize and normalisation (mmdet/mmseg);
* :mod:`.transforms`: the DeiT/timm classification augmentations and the evaluation transform;
* :mod:`.ade20k`: ADE20k's layout, labels and validation set;
* :mod:`.segmentation`: ADE20k's training pipeline and the scikit-image texture set.
"""
