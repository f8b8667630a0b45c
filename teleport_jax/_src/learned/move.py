"""One learned teleport: features, the policy's proposal, the exact action, the gradient moved.

Differentiable end to end (meta-training back-propagates through it) and the
same function the optax transformation applies, so a policy is trained on the
move it will make.
"""

from __future__ import annotations

from typing import Any
from typing import NamedTuple

import chex
import jax

from teleport_jax._src.learned import features as feat_lib
from teleport_jax._src.learned import policy as pol_lib
from teleport_jax._src.solver import state_transport
from teleport_jax._src.symmetries import symmetry as sym_lib


class Move(NamedTuple):
  """A learned teleport's result.

  Attributes:
    params: ``g . params``, the exact action of the proposed element.
    grads: the loss gradient at the new parameters, transported (exact for a
      group action: no model evaluation), or ``None`` if not asked for.
    element: the group element ``g = retract(xi)``.
    proposal: the policy's :class:`~teleport_jax.learned.Proposal` (``xi``, step size, carry).
  """

  params: chex.ArrayTree
  grads: chex.ArrayTree
  element: Any
  proposal: pol_lib.Proposal


def learned_move(
  policy,
  symmetry: sym_lib.Symmetry,
  params: chex.ArrayTree,
  grads: chex.ArrayTree,
  loss: chex.Array,
  carry: Any = (),
  data: Any = None,
  transport: bool = True,
) -> Move:
  """Moves ``params`` by the element ``policy`` proposes from its features.

  Args:
    policy: a policy module (:class:`~teleport_jax.learned.EquivariantPolicy`, ...).
    symmetry: the group, bound to the model.
    params: the parameters.
    grads: the loss gradient at ``params``.
    loss: the loss at ``params``.
    carry: the policy's recurrent state.
    data: the batch, for data-dependent groups.
    transport: carry the gradient to the new point (``False``: ``Move.grads``
      is ``None``, for a caller that evaluates it there).

  Returns:
    A :class:`Move`. It is not checked here: the caller compares the loss.
  """
  feats = feat_lib.algebra_features(symmetry, params, grads, loss, data)
  proposal = policy(pol_lib.PolicyInputs(feats, grads), carry)
  treedef = jax.tree.structure(symmetry.algebra_zeros(params))
  xi = jax.tree.unflatten(treedef, list(proposal.xi))
  g = symmetry.retract(xi)
  new = symmetry.act(params, g, data)
  new_grads = None
  if transport:
    new_grads = state_transport.transport_cotangent(
      grads, params, new, g, symmetry=symmetry, data=data
    )
  return Move(new, new_grads, g, proposal)
