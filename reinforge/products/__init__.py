"""One folder per product; adding a product is adding a folder. reinforge/products/<name>/ holds
  recipe.py        one Recipe subclass whose `product` literal is its name (found by registry.recipes());
                   Recipe.pipeline names the pipeline class as "module:Class"
  pipeline.py      tasks, stages, writer; sample_checker() for `validate`
and where the product has them
  encode.py        the stage that turns a finished sample into its shard members
  report.py        its section of `reinforge report`: sample_stats(layout), section(page, stats)
  inspect_view.py  what `reinforge inspect` prints of its samples: shows(members), describe(...)
The tools ask for a part by product name (registry.product_part), never branch on the names."""
