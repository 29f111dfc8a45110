"""The model layer: loading checkpoints, architecture tables, units and pools, hooks, masks, batching.

Everything here acts on a loaded (or meta-device) model; nothing here knows about rankings or runs.
"""
