"""Reference generative models built on genkern's fused layers, runnable as `python -m models.<name>`.

Here: the DDPM U-Net (models/unet.py). Planned (see the project's issues): a ProGAN trained with
WGAN-GP, a DCGAN and a convolutional VAE, each with a fused and an eager build of the same weights.
The training and sampling entry points come with them.
"""
