"""Datasets, their discretization, and grain input pipelines."""

from ._discretization import Discretization as Discretization
