"""The programs users run: upscale, build-trainset, train, evaluate, report, and the `ugcsr` command line.

A program with private parts is a package (`upscale/`, `train/`, `report/`); a program that is one
file stays one file (`build_trainset.py`, `evaluate.py`). `cli/` holds every command, `paths.py` the
input/output naming rules all programs share.
"""
