"""Reference generative models built on genkern's fused layers, runnable as `python -m models.<name>`.

* models/unet.py + models/ddpm.py: the DDPM U-Net (Ho et al. 2020), `python -m models.ddpm train|sample`;
* models/progan.py: ProGAN with WGAN-GP and progressive growing;
* models/dcgan.py: DCGAN, class-conditional, and its WGAN-GP critic variant;
* models/vae.py: a convolutional VAE with GroupNorm+SiLU ResNet blocks.

Each has a fused and an eager build of the same weights (`fused=` or `--eager`). Shared pieces:
models/data.py (real data without downloads), models/layers.py (eager GAN ops, equalized-LR layers,
slerp), models/common.py (checkpoints, command-line options, grids), models/ema.py.
"""
