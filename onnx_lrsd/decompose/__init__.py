"""Pure numpy/scipy maths of the compressor (importable without onnx).

Orientation everywhere: ``y = x @ W`` with ``W`` of shape ``[in, out]``; conv weights are
``[Cout, Cin, *k]``. All kernels compute in float64.
"""
from .conv import (
    channel_factors_to_convs,
    conv_to_matrix,
    matrix_to_conv,
    spatial_factors_to_convs,
    spatial_matrix,
    spatial_matrix_to_conv,
    tucker2,
    tucker2_to_convs,
    tucker2_whitened,
)
from .evbmf import EVBMFResult, evbmf, evbmf_rank, weakened_rank
from .factors import LowRankFactors, Tucker2Factors
from .lrsd import (
    LowRankSparse,
    SparseResidual,
    SplitChoice,
    best_split,
    lrsd_fit,
    split_budget,
)
from .svd import SVD_SOLVERS, rank_for_energy, randomized_svd, singular_values, truncated_svd
from .whitened import (
    SequentialTarget,
    Whitening,
    bias_correction,
    data_error,
    sequential_target,
    relative_tail_errors,
    whitened_spectrum,
    whitened_svd,
    whitening,
)

__all__ = [
    "LowRankFactors",
    "Tucker2Factors",
    "SVD_SOLVERS",
    "truncated_svd",
    "randomized_svd",
    "singular_values",
    "rank_for_energy",
    "Whitening",
    "SequentialTarget",
    "whitening",
    "relative_tail_errors",
    "whitened_spectrum",
    "whitened_svd",
    "sequential_target",
    "data_error",
    "bias_correction",
    "conv_to_matrix",
    "matrix_to_conv",
    "channel_factors_to_convs",
    "spatial_matrix",
    "spatial_matrix_to_conv",
    "spatial_factors_to_convs",
    "tucker2",
    "tucker2_whitened",
    "tucker2_to_convs",
    "SparseResidual",
    "LowRankSparse",
    "SplitChoice",
    "lrsd_fit",
    "split_budget",
    "best_split",
    "EVBMFResult",
    "evbmf",
    "evbmf_rank",
    "weakened_rank",
]
