"""The paper's tables, rebuilt: reported numbers as data (``tables/tableN.toml``), params/FLOPs counting of every
row (:mod:`reproductions.counting`), accuracy of the released checkpoints (:mod:`reproductions.eval`) and the
side-by-side report (:mod:`reproductions.report`). Entry point: ``python -m reproductions.reproduce table2``.

Numbering (this project's, in the order of the README of PaCaViT@4307018, which numbers no tables): Table 1 =
ImageNet-1k, Table 2 = MS-COCO Mask R-CNN 1×,
Table 3 = ADE20k, Table 4 = the cluster-number / placement ablations. Imports run one way:
reproductions → models → tocalib.
"""
