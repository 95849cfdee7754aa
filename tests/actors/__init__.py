"""Tests of the stage classes (actors/)."""
