"""Pruning algorithms (plain functions over tensors) and the layer-by-layer engine that feeds them."""
