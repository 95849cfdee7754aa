"""Tests of cluster/: pools, lease, weights staging, Ray Jobs, cluster manifests."""
