"""Datasets, their discretization, and grain input pipelines."""

from ._dequantizers import (
    AbstractDequantizer as AbstractDequantizer,
    TruncatedNormalDequantizer as TruncatedNormalDequantizer,
    UniformDequantizer as UniformDequantizer,
)
from ._discretization import Discretization as Discretization
from ._pipeline import (
    ArraySource as ArraySource,
    make_pipeline as make_pipeline,
)
from ._sources import (
    Dataset as Dataset,
    DATASETS as DATASETS,
    digits as digits,
    from_arrays as from_arrays,
    from_file as from_file,
    load_dataset as load_dataset,
    toy as toy,
)
