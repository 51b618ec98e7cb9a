"""Datasets by name (``load_dataset({"name": "mnist"})``), batching, and image augmentation."""

from toolkit.data.batches import BatchStream, to_float_tensor
from toolkit.data.registry import Dataset, Split, available_datasets, load_dataset, register_dataset
from toolkit.data.sources import resolve_data_root

__all__ = ["BatchStream", "Dataset", "Split", "available_datasets", "load_dataset", "register_dataset",
           "resolve_data_root", "to_float_tensor"]
