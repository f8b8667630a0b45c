"""Learned teleports: a policy proposes the group element, for the price of a small forward pass.

A policy (a flax nnx module) reads features in the Lie algebra of a symmetry
-- computed from the parameters and the loss gradient with the action alone,
``O(parameters)`` -- and proposes an algebra element (and optionally a step
size). :func:`learned_teleport` applies it before optimizer steps with the
exact action and the library's guard; :func:`meta_train` trains it by
truncated back-propagation through unrolled training runs (``lax.scan`` over
steps, ``vmap`` over tasks). See ``docs/learned.md``.
"""

from teleport_jax._src.learned.features import FEATURES
from teleport_jax._src.learned.features import Features
from teleport_jax._src.learned.features import algebra_features
from teleport_jax._src.learned.io import load_policy
from teleport_jax._src.learned.io import save_policy
from teleport_jax._src.learned.meta import MetaConfig
from teleport_jax._src.learned.meta import MetaResult
from teleport_jax._src.learned.meta import TaskFamily
from teleport_jax._src.learned.meta import inner_step
from teleport_jax._src.learned.meta import meta_train
from teleport_jax._src.learned.meta import optimizer_carry
from teleport_jax._src.learned.meta import optimizer_step
from teleport_jax._src.learned.move import Move
from teleport_jax._src.learned.move import learned_move
from teleport_jax._src.learned.policy import EquivariantPolicy
from teleport_jax._src.learned.policy import LSTMPolicy
from teleport_jax._src.learned.policy import PolicyConfig
from teleport_jax._src.learned.policy import PolicyInputs
from teleport_jax._src.learned.policy import Proposal
from teleport_jax._src.learned.policy import make_policy
from teleport_jax._src.learned.transform import LearnedTeleportState
from teleport_jax._src.learned.transform import learned_teleport

__all__ = (
  "FEATURES",
  "EquivariantPolicy",
  "Features",
  "LSTMPolicy",
  "LearnedTeleportState",
  "MetaConfig",
  "MetaResult",
  "Move",
  "PolicyConfig",
  "PolicyInputs",
  "Proposal",
  "TaskFamily",
  "algebra_features",
  "inner_step",
  "learned_move",
  "learned_teleport",
  "load_policy",
  "make_policy",
  "meta_train",
  "optimizer_carry",
  "optimizer_step",
  "save_policy",
)
