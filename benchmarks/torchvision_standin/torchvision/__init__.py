"""A stand-in for torchvision, for ``nox -s bench`` only: the names that ``import timm`` touches, and nothing more.

No torchvision wheel matches this CPU build of torch, and timm imports torchvision names at import time (its data
pipeline, its frozen batch norm). The benchmark builds timm's backbones, which use none of them; every stand-in
class refuses to be used. Only the ``bench`` session puts ``benchmarks/torchvision_standin`` on ``PYTHONPATH``.
"""


class Missing:
    """A torchvision class that timm names at import time but the benchmark never uses."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError(f"{type(self).__name__} comes from a torchvision stand-in (benchmarks only)")
