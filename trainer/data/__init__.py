"""Data sets: digits (default), synthetic, and the user's own npz and CSV files."""

from trainer.data.base import Data, DataModule
from trainer.data.digits import digits
from trainer.data.files import csv_file, npz
from trainer.data.synthetic import synthetic

__all__ = ["Data", "DataModule", "csv_file", "digits", "npz", "synthetic"]
