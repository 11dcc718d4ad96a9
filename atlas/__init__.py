"""Atlas: static model atlases (feature visualizations, dataset examples,
attributions and their sanity checks) for PyTorch vision models."""

__version__ = "0.1.0"
