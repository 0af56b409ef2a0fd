"""Pallas GPU kernels for lowbit-jax. Each file holds one kernel and imports only jax.

``lowbit_jax.ops`` is the only caller that chooses among them.
"""
