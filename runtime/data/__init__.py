"""Data: find the images (sources), decode every image once (decode), and keep the decoded uint8
tensors in memory or memory-mapped from the cache, split for training (load).

On a CPU, decoding JPEGs every epoch costs more than training the small student, so images are
decoded (and resized to the training size) exactly once, in `load`.
"""
from .decode import IMAGE_MODES, to_shape
from .load import Data, Split, check_decodable, check_memory, load
from .sources import DIGITS, DataError, Listing, list_folder, list_source

__all__ = ["DIGITS", "IMAGE_MODES", "Data", "DataError", "Listing", "Split", "check_decodable", "check_memory",
           "list_folder", "list_source", "load", "to_shape"]
