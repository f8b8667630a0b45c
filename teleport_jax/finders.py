"""Where a group acts: finders that locate the sites of common architectures.

Each finder (``mlp_chain``, ``conv_chain``, ``attention_qk``, ...) reads a
parameter pytree and returns a :class:`~teleport_jax.symmetries.SiteSymmetry`;
the path predicates (``PathContains``, ``PathEndsWith``, ``OfNdim``, combined
with ``&``, ``|``, ``~``) say which leaves it may use. See ``docs/symmetries.md``.
"""

from teleport_jax._src.symmetries.finders import BATCHNORM_SCALES
from teleport_jax._src.symmetries.finders import CONV_KERNELS
from teleport_jax._src.symmetries.finders import DENSE_KERNELS
from teleport_jax._src.symmetries.finders import NORM_PARAMS
from teleport_jax._src.symmetries.finders import NORM_READERS
from teleport_jax._src.symmetries.finders import STREAM_READERS
from teleport_jax._src.symmetries.finders import STREAM_WRITERS
from teleport_jax._src.symmetries.finders import All
from teleport_jax._src.symmetries.finders import AnyOf
from teleport_jax._src.symmetries.finders import Everything
from teleport_jax._src.symmetries.finders import Not
from teleport_jax._src.symmetries.finders import OfNdim
from teleport_jax._src.symmetries.finders import PathContains
from teleport_jax._src.symmetries.finders import PathEndsWith
from teleport_jax._src.symmetries.finders import PathMatches
from teleport_jax._src.symmetries.finders import Predicate
from teleport_jax._src.symmetries.finders import as_predicate
from teleport_jax._src.symmetries.finders import attention_qk
from teleport_jax._src.symmetries.finders import attention_vo
from teleport_jax._src.symmetries.finders import batchnorm_scale
from teleport_jax._src.symmetries.finders import conv_chain
from teleport_jax._src.symmetries.finders import dimension
from teleport_jax._src.symmetries.finders import feed_forward
from teleport_jax._src.symmetries.finders import lora
from teleport_jax._src.symmetries.finders import mlp_chain
from teleport_jax._src.symmetries.finders import norm_into_dense
from teleport_jax._src.symmetries.finders import reglu
from teleport_jax._src.symmetries.finders import residual_stream
from teleport_jax._src.symmetries.finders import sites

__all__ = (
  "All",
  "AnyOf",
  "BATCHNORM_SCALES",
  "CONV_KERNELS",
  "DENSE_KERNELS",
  "Everything",
  "NORM_PARAMS",
  "NORM_READERS",
  "Not",
  "OfNdim",
  "PathContains",
  "PathEndsWith",
  "PathMatches",
  "Predicate",
  "STREAM_READERS",
  "STREAM_WRITERS",
  "as_predicate",
  "attention_qk",
  "attention_vo",
  "batchnorm_scale",
  "conv_chain",
  "dimension",
  "feed_forward",
  "lora",
  "mlp_chain",
  "norm_into_dense",
  "reglu",
  "residual_stream",
  "sites",
)
