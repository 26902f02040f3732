"""Variational dequantization: a conditional flow `q(u | k)` and its objective."""

from ._dequantizer import VariationalDequantizer as VariationalDequantizer
from ._loss import dequantization_loss as dequantization_loss
from ._train import (
    DequantizerTrainResult as DequantizerTrainResult,
    load_dequantizer as load_dequantizer,
    train_dequantizer as train_dequantizer,
)
