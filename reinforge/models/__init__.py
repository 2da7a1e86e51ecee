"""Model specs, loading, preprocessing and precision: timm classifiers, open_clip CLIP and CoCa."""
