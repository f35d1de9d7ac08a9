"""The paper's tables, rebuilt: reported numbers as data (``tables/tableN.toml``), params/FLOPs counting of every
row (:mod:`tocalib.reproductions.counting`), accuracy of the released checkpoints
(:mod:`tocalib.reproductions.eval`) and the side-by-side report (:mod:`tocalib.reproductions.report`). Entry
point: ``tocalib-reproduce table2`` (or ``python -m tocalib.reproductions.reproduce table2``).

Numbering (this project's, in the order of the README of PaCaViT@4307018, which numbers no tables): Table 1 =
ImageNet-1k, Table 2 = MS-COCO Mask R-CNN 1×,
Table 3 = ADE20k, Table 4 = the cluster-number / placement ablations. Imports run one way:
reproductions → models → tocalib.
"""
