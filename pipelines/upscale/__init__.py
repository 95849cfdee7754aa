"""`ugcsr upscale` as a program: the driver (`run`), its job config (`job`), planning and listing (`listing`),
the per-image manifest (`manifest`), actor pool plans (`pools`), and reading what a run left (`outputs`)."""
