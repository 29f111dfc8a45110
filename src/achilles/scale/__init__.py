"""Scaling out: sizing a run from the config alone (plan) and many models in one study (census).
"""
