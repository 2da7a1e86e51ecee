"""What reinforge reads and writes: sample layouts, augmentation entries and their replay, subsets, shards, recipes."""
