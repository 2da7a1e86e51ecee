"""One folder per product: its recipe, pipeline (tasks + stages + writer) and checks; the registry names them."""
