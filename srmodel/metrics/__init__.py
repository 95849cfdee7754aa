"""Image quality metrics: the challenge's PSNR/SSIM and Score (`challenge`), LPIPS and the no-reference ones (`learned`)."""
