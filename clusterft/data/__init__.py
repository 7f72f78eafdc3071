"""Datasets: the dataset_info.json registry, alpaca/sharegpt loading, chat templates, tokenization
with label masking, the eval split, the Arrow cache (memory-mapped), packing, streaming, a
resumable sampler and batching.

The training, eval and serving code use only the names exported here.
"""

from clusterft.data.builder import DatasetSplits, build_datasets
from clusterft.data.cache import run_cache_dir
from clusterft.data.collate import collate, model_inputs
from clusterft.data.errors import BadRecord, DatasetError
from clusterft.data.example import Example
from clusterft.data.loader import load_examples
from clusterft.data.metrics import exact_match
from clusterft.data.preprocess import IGNORE_INDEX, EncodedExample, encode_example
from clusterft.data.preview import preview
from clusterft.data.registry import DatasetAttr, load_dataset_info
from clusterft.data.sampler import EpochBatchSampler
from clusterft.data.table import TokenizedDataset
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
    "TokenizedDataset",
    "build_datasets",
    "collate",
    "encode_example",
    "exact_match",
    "get_template",
    "load_dataset_info",
    "load_examples",
    "model_inputs",
    "preview",
    "render_prompt",
    "run_cache_dir",
]
