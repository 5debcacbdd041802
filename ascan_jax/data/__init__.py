"""Input pipelines: record sources, image transforms, grain pipelines and global batches."""
