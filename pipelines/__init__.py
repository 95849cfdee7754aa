"""The programs users run: `ugcsr upscale` (and, later, build-trainset, train, evaluate)."""
