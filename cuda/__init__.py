"""CUDA kernel sources (``*.cu``) of the GPU backend, installed as package data."""
