"""Helpers shared by the tests: inputs, fake runs, a fault-injecting S3 proxy, the browser, cluster uploads."""
