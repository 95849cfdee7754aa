"""Where things run: Ray connection, job submission, storage config, cluster manifests."""
