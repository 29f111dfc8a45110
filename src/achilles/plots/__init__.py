"""Figures from result files (headless matplotlib; no computation here)."""
