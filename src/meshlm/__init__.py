"""meshlm: stateless Flax language models compiled with jax.jit onto a device mesh."""

__version__ = "0.1.0"
