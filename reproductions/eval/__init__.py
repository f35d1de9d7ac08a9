"""Accuracy of the released checkpoints: ImageNet top-1 (:mod:`.imagenet`), ADE20k mIoU (:mod:`.ade20k`), COCO
box/mask AP (:mod:`.coco`).

Each module evaluates a loaded model on a dataset folder; :func:`tocalib.reproductions.tasks.evaluate_row` builds a
table row's model, loads its checkpoint strictly and calls the row's task's evaluation. Readers use Pillow and
numpy only (:mod:`tocalib.reproductions.data`); the COCO metric needs pycocotools (``pip install pycocotools``),
imported only when a COCO row is evaluated.
"""
