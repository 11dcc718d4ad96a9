"""Atlas: static model atlases (feature visualizations, dataset examples,
attributions and their sanity checks) for PyTorch vision models."""

__version__ = "0.1.0"
STORE_FORMAT = 1  # bumped whenever the store layout changes incompatibly
