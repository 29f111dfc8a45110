"""Run files and provenance: atomic writes, destination checks, output-folder locks, reading result
files back, and the environment recorded with every result.
"""
