"""`ugcsr train` as a program: the driver (`driver`: run_train, checkpoints, export), its job config (`job`),
the loop in each Ray Train worker (`worker`), and the data stage (`data`: shards, held-out split, Ray Data stream)."""
