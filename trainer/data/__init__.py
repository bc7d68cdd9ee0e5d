"""Data sets: digits (default), synthetic, the user's own npz and CSV files, TFRecord shards,
folders of images; and the option objects they take (``Batching``, ``Split``, ...)."""

from trainer.data.base import Data, DataModule
from trainer.data.digits import digits
from trainer.data.files import csv_file, npz
from trainer.data.images import ImageFolderData, images
from trainer.data.options import Arrays, Batching, Columns, Generation, Keys, Split
from trainer.data.preparation import Scaling
from trainer.data.synthetic import synthetic
from trainer.data.tfrecord import tfrecord

__all__ = ["Arrays", "Batching", "Columns", "Data", "DataModule", "Generation",
           "ImageFolderData", "Keys", "Scaling", "Split", "csv_file", "digits", "images", "npz",
           "synthetic", "tfrecord"]
