"""Driver-side data curation: filters, faiss index and transfer sets, TiC time splits and replay schedules."""
