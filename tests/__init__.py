"""The test suite, by part: srmodel/, actors/, pipelines/, cluster/; helpers in support/, fixtures in conftest.py."""
