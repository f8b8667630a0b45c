"""The foundation: the library's error, pytree paths, the jaxpr tracer, fixed
host-drawn noise (:mod:`.noise`),
low-precision dtypes (:mod:`.precision`) and how a loss is called
(:mod:`.losses`).

Imports nothing from the other subpackages of ``teleport_jax._src``.
"""
