"""The UniPinRec Kubeflow pipeline: `pipeline.py` wires the components, `run.py` compiles,
runs locally, submits and schedules it."""
