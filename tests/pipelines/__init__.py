"""Tests of the programs and the command line (pipelines/), most against local Ray and a local S3 server."""
