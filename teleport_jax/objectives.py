"""What a teleport optimises: objectives and the stability constraint.

``tj.objectives.lookahead_loss`` (the default, as ``"lookahead"``) simulates
gradient-descent steps, ``optimizer_lookahead`` the optax optimizer that runs
after the teleport, ``grad_norm_sq`` is the published max-``‖∇L‖²``; any
:class:`Objective` or plain callable ``fn(loss_fn, params, data) -> scalar``
works. See ``docs/usage.md``.
"""

from teleport_jax._src.objectives.objectives import Objective
from teleport_jax._src.objectives.objectives import ObjectiveContext
from teleport_jax._src.objectives.objectives import as_objective
from teleport_jax._src.objectives.objectives import grad_norm_sq
from teleport_jax._src.objectives.objectives import lookahead_loss
from teleport_jax._src.objectives.objectives import optimizer_lookahead
from teleport_jax._src.objectives.objectives import stability_constrained
from teleport_jax._src.objectives.stability import Stability

__all__ = (
  "Objective",
  "ObjectiveContext",
  "Stability",
  "as_objective",
  "grad_norm_sq",
  "lookahead_loss",
  "optimizer_lookahead",
  "stability_constrained",
)
