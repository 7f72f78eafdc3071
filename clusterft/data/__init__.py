"""Datasets: the dataset_info.json registry, alpaca/sharegpt loading, chat templates, tokenization
with label masking, the eval split, a resumable sampler and batching.

The training, eval and serving code use only the names exported here.
"""

from clusterft.data.builder import DatasetSplits, build_datasets
from clusterft.data.collate import collate
from clusterft.data.errors import BadRecord, DatasetError
from clusterft.data.example import Example
from clusterft.data.loader import load_examples
from clusterft.data.metrics import exact_match
from clusterft.data.preprocess import IGNORE_INDEX, EncodedExample, encode_example
from clusterft.data.preview import preview
from clusterft.data.registry import DatasetAttr, load_dataset_info
from clusterft.data.sampler import EpochBatchSampler
from clusterft.data.template import get_template, render_prompt

__all__ = [
    "IGNORE_INDEX",
    "BadRecord",
    "DatasetAttr",
    "DatasetError",
    "DatasetSplits",
    "EncodedExample",
    "EpochBatchSampler",
    "Example",
    "build_datasets",
    "collate",
    "encode_example",
    "exact_match",
    "get_template",
    "load_dataset_info",
    "load_examples",
    "preview",
    "render_prompt",
]
