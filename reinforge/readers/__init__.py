"""What a trainer imports: datasets that replay stored augmentations. Depends on reinforge.formats and reinforge.io only."""
from reinforge.readers.imagenet_plus import ReinforcedImageNet, kd_loss, shard_urls

__all__ = ["ReinforcedImageNet", "kd_loss", "shard_urls"]
