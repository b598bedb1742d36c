"""Kernels that move paged KV between layouts (Triton; CUDA C++ to come)."""
