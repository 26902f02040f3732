from typing import TypeAlias

from jaxtyping import Array, ArrayLike, Float, Real


#: A scalar time, as a Python float or a 0-d array.
RealScalarLike: TypeAlias = Real[ArrayLike, ""]
#: One example of any shape (no batch axis).
Data: TypeAlias = Float[Array, "*data"]
#: A 0-d float array.
Scalar: TypeAlias = Float[Array, ""]
