"""Symmetries: exact group actions on parameter pytrees.

The MLP groups (:class:`PositiveRescaling`, :class:`LinearGL`,
:class:`DataDependentGL`, the published action kept for comparison), the
rotations of quadratic and 2-D test problems, and the building blocks of
any model's symmetry (:class:`Site`, :class:`Slot`, :class:`SiteSymmetry`,
:class:`Product`). See ``docs/symmetries.md``.
"""

from teleport_jax._src.symmetries.data_gl import DataDependentGL
from teleport_jax._src.symmetries.data_gl import PublishedDataDependentGL
from teleport_jax._src.symmetries.data_gl import default_get_inputs
from teleport_jax._src.symmetries.layouts import MLPLayout
from teleport_jax._src.symmetries.layouts import infer_layout
from teleport_jax._src.symmetries.linear_gl import LinearGL
from teleport_jax._src.symmetries.rescaling import PositiveRescaling
from teleport_jax._src.symmetries.rotation import QuadraticRotation
from teleport_jax._src.symmetries.rotation import Rotation
from teleport_jax._src.symmetries.sites import Product
from teleport_jax._src.symmetries.sites import Site
from teleport_jax._src.symmetries.sites import SiteSymmetry
from teleport_jax._src.symmetries.sites import Slot
from teleport_jax._src.symmetries.sites import product
from teleport_jax._src.symmetries.symmetry import Symmetry

__all__ = (
  "DataDependentGL",
  "LinearGL",
  "MLPLayout",
  "PositiveRescaling",
  "Product",
  "PublishedDataDependentGL",
  "QuadraticRotation",
  "Rotation",
  "Site",
  "SiteSymmetry",
  "Slot",
  "Symmetry",
  "default_get_inputs",
  "infer_layout",
  "product",
)
