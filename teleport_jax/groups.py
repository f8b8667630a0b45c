"""What a group does on a channel axis: rescaling, GL, orthogonal, rotary.

A :class:`~teleport_jax.symmetries.Site` says where a group acts; a group
here says what it does there. See ``docs/symmetries.md``.
"""

from teleport_jax._src.symmetries.groups import GL
from teleport_jax._src.symmetries.groups import Group
from teleport_jax._src.symmetries.groups import Orthogonal
from teleport_jax._src.symmetries.groups import RotaryGL
from teleport_jax._src.symmetries.groups import Scaling
from teleport_jax._src.symmetries.groups import as_group

__all__ = (
  "GL",
  "Group",
  "Orthogonal",
  "RotaryGL",
  "Scaling",
  "as_group",
)
