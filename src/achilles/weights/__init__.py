"""Interventions on weights: a checkpoint with the mask in its weights (export), and quantization or
pruning with the critical units spared (compress).
"""
