"""Kubeflow Pipelines components of UniPinRec: one typed component per step, each a few lines
over `unipinrec.steps`, all on the project image (components/_image.py)."""
from .bucket_ids import bucket_ids
from .build_examples import build_examples
from .build_features import build_features
from .build_index import build_index
from .deploy import deploy
from .evaluate import evaluate
from .gate import gate
from .ingest import ingest
from .merge_examples import merge_examples
from .package import package
from .stop_run import stop_run
from .train import train
from .validate_data import validate_data

ALL = (ingest, validate_data, stop_run, build_features, bucket_ids, build_examples, merge_examples, train,
       evaluate, gate, build_index, package, deploy)

__all__ = ["ALL", "bucket_ids", "build_examples", "build_features", "build_index", "deploy", "evaluate", "gate",
           "ingest", "merge_examples", "package", "stop_run", "train", "validate_data"]
