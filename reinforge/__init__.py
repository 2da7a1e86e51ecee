"""reinforge: reinforced and curated datasets at cluster scale."""
__version__ = "0.1.0"
