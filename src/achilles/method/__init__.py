"""The core method: stage-1 rankings, stage-2 searches and identification, metrics, the fp32 re-check,
and the pipeline that prepares a run and chains them.
"""
