"""Kubeflow Pipelines components of UniPinRec: one typed component per step, each a few lines
over `unipinrec.steps`, all on the project image (components/_image.py)."""
from .build_examples import build_examples
from .build_features import build_features
from .build_index import build_index
from .deploy import deploy
from .evaluate import evaluate
from .gate import gate
from .ingest import ingest
from .package import package
from .stop_run import stop_run
from .train import train
from .validate_data import validate_data

ALL = (ingest, validate_data, stop_run, build_features, build_examples, train, evaluate, gate, build_index,
       package, deploy)

__all__ = ["ALL", "build_examples", "build_features", "build_index", "deploy", "evaluate", "gate", "ingest",
           "package", "stop_run", "train", "validate_data"]
