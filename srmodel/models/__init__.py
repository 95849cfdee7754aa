"""The networks of the released model: SemanticUNet, SemanticControlNet (SD-2 blocks + image cross-attention),
the VAE (with the release's GroupNorm-sharing tiles), the CLIP text encoder, and strict loading of their folders."""
