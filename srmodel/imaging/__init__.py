"""Images before and after the diffusion model: the release and exact-size paths, size planning, the colour fix."""
