"""Backends: where NetworkManager's primitives are carried out (the kernel, or a model of it)."""
